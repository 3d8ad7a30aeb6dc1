import json

import pytest
import torch
from conftest import assert_reloaded_equal, batches, tiny_model

from compress.gptq import gptq
from compress.grid import QuantSpec, rtn
from compress.layers import OutlierQuantLinear, quant_module, to_linear
from compress.outliers import outlier_count, owq


def h_error(W, W_hat, H):
    D = (W - W_hat).double()
    return ((D @ H.double()) * D).sum().item()


def outlier_inputs(n=2048, d=96, seed=0):
    """Correlated inputs with three planted outlier channels (5, 40, 77), as OWQ's activation outliers."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g) @ torch.randn(d, d, generator=g) * 0.3 + torch.randn(n, d, generator=g)
    X[:, [5, 40, 77]] *= 20.0
    return X


SPECS = [QuantSpec(3, -1, False), QuantSpec(3, 32, True), QuantSpec(4, 48, False)]


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("feedback", [True, False])
def test_kept_columns_are_the_top_k_by_sensitivity_and_stored_exactly(spec, feedback):
    X = outlier_inputs()
    H = 2 * X.T @ X / X.shape[0]
    W = (torch.randn(64, 96, generator=torch.Generator().manual_seed(1)) * 0.05).half().float()  # float16 weights
    k = 6
    q = owq(W, H, spec, k, feedback=feedback, block_size=48)
    sensitivity = H.diagonal() * (W - rtn(W, spec).weight).square().sum(0)  # OWQ's λ_j ‖ΔW_:j‖²
    assert set(q.outlier_idx.tolist()) == set(sensitivity.topk(k).indices.tolist())
    assert {5, 40, 77} <= set(q.outlier_idx.tolist())  # the planted outlier channels are among them
    kept = q.weight[:, q.outlier_idx]
    assert torch.equal(kept, q.outlier) and torch.equal(kept, kept.half().float())  # what is stored, in float16
    if not feedback:  # left alone: bit-exact original values
        assert torch.equal(kept, W[:, q.outlier_idx])
    zero = q.zero.repeat_interleave(spec.group(96), 1)[:, :96]
    assert torch.equal(q.codes[:, q.outlier_idx].float(), zero[:, q.outlier_idx])  # dequantize to exactly 0
    assert (q.codes.float().sub(zero).mul(q.scale.repeat_interleave(spec.group(96), 1)[:, :96])
            [:, q.outlier_idx] == 0).all()


@pytest.mark.parametrize("spec", SPECS)
def test_owq_h_error_is_below_gptq_at_the_same_bits_without_outliers(spec):
    X = outlier_inputs()
    H = 2 * X.T @ X / X.shape[0]
    W = torch.randn(64, 96, generator=torch.Generator().manual_seed(2)) * 0.05
    base = gptq(W, H, spec, static_groups=True, block_size=48)
    none = owq(W, H, spec, 0, block_size=48)  # no weak columns: exactly GPTQ with the same grids
    assert torch.equal(none.codes, base.codes) and torch.equal(none.weight, base.weight)
    for feedback in (True, False):
        err = [h_error(W, owq(W, H, spec, k, feedback=feedback, block_size=48).weight, H) for k in (1, 3, 6)]
        assert err[0] < h_error(W, base.weight, H)
        assert err[2] < 0.2 * h_error(W, base.weight, H)  # the three planted outliers carried most of the error
        assert err[2] <= err[1] * 1.01


def test_owq_beats_gptq_on_real_activations(real_block0):
    linear, X = real_block0["self_attn.q_proj"]
    W = linear.weight.detach().float()[:128]  # a slice of the rows keeps it fast; rows are independent
    H = 2 * X.T.double() @ X.double() / X.shape[0]
    spec = QuantSpec(3, -1, False)
    errors = {f: h_error(W, owq(W, H.float(), spec, 3, feedback=f).weight, H) for f in (True, False)}
    assert max(errors.values()) < 0.9 * h_error(W, gptq(W, H.float(), spec).weight, H)


def test_average_bits_count_the_float16_columns_indices_scales_and_zero_points():
    W, H = torch.randn(64, 96), torch.eye(96)
    q = owq(W, H, QuantSpec(3, 32, False), 5, block_size=32)
    per_layer = 3 * 64 * 96 + 3 * 64 * (16 + 3) + 5 * (64 * 16 + 32)  # codes, 3 groups' scale and zero, columns
    assert q.avg_bits * 64 * 96 == pytest.approx(per_layer)
    assert outlier_count(576, 0.005) == 3 and outlier_count(1536, 0.005) == 8 and outlier_count(64, 0.005) == 1


def test_outlier_quant_linear_forward_is_linear_with_its_weight():
    X = outlier_inputs(512, 96)
    W, b = torch.randn(20, 96) * 0.05, torch.randn(20)
    q = owq(W, 2 * X.T @ X / 512, QuantSpec(3, 32, False), 4, block_size=32)
    m = quant_module(q, b)
    assert isinstance(m, OutlierQuantLinear)
    assert torch.equal(m.dequantized_weight(), q.weight)
    x = torch.randn(3, 5, 96)
    torch.testing.assert_close(m(x), torch.nn.functional.linear(x, q.weight, b), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(to_linear(m)(x), m(x), rtol=1e-6, atol=1e-6)


def test_owq_checkpoint_round_trip_gives_identical_logits(tmp_path, tokenizer):
    from safetensors import safe_open

    from compress.apply import compress_
    from compress.loading import describe, load
    from compress.recipe import recipe_from_dict
    from compress.saving import save, stock_notes

    model = tiny_model()
    q = {"method": "gptq", "bits": 3, "group_size": 32, "sym": False, "outlier_fraction": 0.05}
    recipe = recipe_from_dict({"steps": [{"quantize": q}], "calib": {"samples": 8, "seqlen": 32}})
    report = compress_(model, recipe, batches(8, 32), progress=False)
    assert all(r["avg_bits"] > 3 + 3 * (16 + 3) / 128 for r in report.layers)  # the kept columns cost bits
    out = save(model, tokenizer, tmp_path / "out")
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config  # stock loaders must not take the quantized part alone
    entries = config["compression_config"]["modules"]
    assert len(entries) == 14 and all(e["type"] == "owq" and e["outliers"] >= 1 for e in entries.values())
    with safe_open(out / "model.safetensors", "pt") as f:
        name = "model.layers.0.mlp.down_proj"
        assert f.get_tensor(f"{name}.weight_outlier").dtype == torch.float16
        assert f.get_tensor(f"{name}.outlier_idx").dtype == torch.int32
        assert f.get_tensor(f"{name}.weight_packed").shape == (64, 12)  # 128 3-bit codes in 12 int32
    assert any("OWQ" in n and "cannot load" in n for n in stock_notes(model))
    reloaded, _ = load(out)
    assert_reloaded_equal(model, reloaded, torch.randint(0, 300, (2, 20)))
    assert {r["type"] for r in describe(out) if r["module"].startswith("model.layers.")} >= {"owq"}
