import json

import pytest
import torch
from conftest import assert_reloaded_equal, batches, tiny_model

from compress.gptq import gptq
from compress.grid import QuantSpec
from compress.layers import LutLinear, quant_module, to_linear
from compress.nonuniform import leanquant, lut_dequantize, nearest_level, weighted_kmeans


def h_error(W, W_hat, H):
    D = (W - W_hat).double()
    return ((D @ H.double()) * D).sum().item()


def correlated_inputs(n=2048, d=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g) @ torch.randn(d, d, generator=g) * 0.3 + torch.randn(n, d, generator=g)
    return X + torch.randn(n, d, generator=g)


def test_weighted_kmeans_levels_are_the_weighted_means_of_their_values():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(40, 300, generator=g)
    weight = torch.rand(300, generator=g) ** 4  # uneven, as U_jj^-p is
    C = weighted_kmeans(W, weight, 8)
    assert C.shape == (40, 8) and (C.diff(dim=1) >= 0).all()
    assign = nearest_level(W, C)  # Lloyd's fixed point: each level is the weighted mean of the values nearest it
    w = weight.expand_as(W)
    num = torch.zeros_like(C).scatter_add_(1, assign, W * w)
    den = torch.zeros_like(C).scatter_add_(1, assign, w)
    torch.testing.assert_close(torch.where(den > 0, num / den, C), C, rtol=0, atol=1e-5)
    # a heavily weighted value pulls its level onto itself
    row = torch.tensor([[0.0, 0.1, 0.2, 0.3, 1.0, 1.1, 1.2, 5.0]])
    heavy = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1e6, 1.0])
    assert (weighted_kmeans(row, heavy, 3) - 1.2).abs().min() < 1e-4
    assert (weighted_kmeans(row, torch.ones(8), 3) - 1.2).abs().min() > 0.1


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("act_order", [False, True])
def test_leanquant_objective_is_no_worse_than_gptq_on_the_same_layer(bits, act_order):
    X = correlated_inputs()
    X[:, :3] *= 10.0  # a few strong inputs make the inverse-Hessian diagonal uneven
    H = 2 * X.T @ X / X.shape[0]
    W = torch.randn(64, 96, generator=torch.Generator().manual_seed(1)) * 0.05
    lq = leanquant(W, H, bits, act_order=act_order)
    uniform = gptq(W, H, QuantSpec(bits, -1, False), act_order=act_order)
    assert h_error(W, lq.weight, H) < h_error(W, uniform.weight, H)


def test_leanquant_beats_gptq_on_real_activations(real_block0):
    linear, X = real_block0["self_attn.q_proj"]
    W = linear.weight.detach().float()[:128]
    H = 2 * X.T.double() @ X.double() / X.shape[0]
    lq = leanquant(W, H.float(), 3, act_order=True)
    uniform = gptq(W, H.float(), QuantSpec(3, -1, False), act_order=True)
    assert h_error(W, lq.weight, H) < h_error(W, uniform.weight, H)


def test_codes_index_the_table_and_the_table_is_float16():
    X = correlated_inputs(512, 64)
    W = torch.randn(24, 64) * 0.05
    q = leanquant(W, 2 * X.T @ X / 512, 3)
    assert q.codes.dtype == torch.uint8 and int(q.codes.max()) < 8 and q.lut.shape == (24, 1, 8)
    assert torch.equal(q.lut, q.lut.half().float())
    assert torch.equal(q.weight, q.lut[:, 0, :].gather(1, q.codes.long()))
    assert q.avg_bits == pytest.approx(3 + 8 * 16 / 64)


def test_pruned_zeros_survive_leanquant():
    X = correlated_inputs(512, 64)
    W = torch.randn(24, 64)
    keep = torch.rand(24, 64, generator=torch.Generator().manual_seed(3)) > 0.5
    q = leanquant(W, 2 * X.T @ X / 512, 3, keep=keep)
    assert (q.weight[~keep] == 0).all() and (q.weight[keep] != 0).float().mean() > 0.7


def test_lut_dequantize_reads_one_table_per_group():
    codes = torch.tensor([[0, 1, 1, 0, 1]], dtype=torch.uint8)
    lut = torch.tensor([[[-1.0, 1.0], [-2.0, 2.0], [-3.0, 3.0]]])  # 3 groups of 2 inputs (the last ragged)
    assert lut_dequantize(codes, lut, 2).tolist() == [[-1.0, 1.0, 2.0, -2.0, 3.0]]


def test_lut_linear_forward_runs_the_reference_kernel():
    from compress.kernels import reference
    from compress.kernels.dispatch import lut_linear

    X = correlated_inputs(512, 70)
    W, b = torch.randn(20, 70) * 0.05, torch.randn(20)
    q = leanquant(W, 2 * X.T @ X / 512, 4)
    m = quant_module(q, b)
    assert isinstance(m, LutLinear) and torch.equal(m.dequantized_weight(), q.weight)
    x = torch.randn(3, 5, 70)
    assert torch.equal(m(x), torch.nn.functional.linear(x, q.weight, b))
    assert torch.equal(lut_linear(x, m.weight_packed, m.weight_lut, 4, -1, b),
                       reference.lut_linear(x, m.weight_packed, m.weight_lut, 4, -1, b))
    assert torch.equal(to_linear(m)(x), m(x))


def test_lut_linear_refuses_a_forced_fast_path(monkeypatch):
    from compress.kernels.dispatch import lut_linear

    monkeypatch.setenv("COMPRESS_KERNELS", "cpu")
    with pytest.raises(ValueError, match="only the reference"):
        lut_linear(torch.randn(2, 32), torch.zeros(2, 3, dtype=torch.int32), torch.zeros(2, 1, 8), 3, -1)


def test_leanquant_checkpoint_round_trip_gives_identical_logits(tmp_path, tokenizer):
    from compress.apply import compress_
    from compress.loading import describe, load
    from compress.recipe import recipe_from_dict
    from compress.saving import save, stock_notes, to_dense_

    model = tiny_model()
    recipe = recipe_from_dict({"steps": [{"quantize": {"method": "leanquant", "bits": 3, "group_size": -1}}],
                               "calib": {"samples": 8, "seqlen": 32}})
    report = compress_(model, recipe, batches(8, 32), progress=False)
    assert all(r["avg_bits"] == pytest.approx(3 + 8 * 16 / (64 if "down" not in r["module"] else 128))
               for r in report.layers)
    out = save(model, tokenizer, tmp_path / "out")
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    assert {e["type"] for e in config["compression_config"]["modules"].values()} == {"lut"}
    assert any("LeanQuant" in n and "cannot load" in n for n in stock_notes(model))
    reloaded, _ = load(out)
    assert sum(isinstance(m, LutLinear) for m in reloaded.modules()) == 14
    ids = torch.randint(0, 300, (2, 20))
    logits = assert_reloaded_equal(model, reloaded, ids)
    with torch.no_grad():
        to_dense_(reloaded)
        torch.testing.assert_close(reloaded(ids).logits, logits, rtol=1e-5, atol=1e-5)
    rows = [r for r in describe(out) if r["type"] == "lut"]
    assert len(rows) == 14 and all(r["bits"] == 3 for r in rows)
