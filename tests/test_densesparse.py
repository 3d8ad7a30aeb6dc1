import json

import pytest
import torch
from conftest import assert_reloaded_equal, batches, tiny_model

from compress.densesparse import dense_and_sparse, sparse_count
from compress.gptq import gptq
from compress.grid import QuantSpec, choose_qparams, rtn
from compress.layers import DenseSparseLinear, quant_module, to_linear
from compress.recipe import recipe_from_dict

SPECS = [QuantSpec(3, 32, False), QuantSpec(3, -1, False), QuantSpec(4, 48, True)]


def inputs(n=1024, d=96, seed=0):
    """Correlated inputs whose channels differ in scale, as a Linear's inputs do."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g) @ torch.randn(d, d, generator=g) * 0.3 + torch.randn(n, d, generator=g)
    return X * torch.rand(d, generator=g).mul(4).exp()


def weights(out=64, d=96, seed=1):
    """Heavy-tailed float16 weights (Student t, 3 degrees of freedom), as trained weights are."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(out, d, generator=g)
    chi = torch.randn(3, out, d, generator=g).square().sum(0) / 3
    t = z / chi.sqrt()
    return (t * 0.02).half().float()


def output_error(W, W_hat, X):
    return ((X.double() @ (W - W_hat).double().t()) ** 2).sum().item()


def expected_scores(W, H, spec, score):
    if score == "magnitude":
        return W.abs()
    return H.diagonal()[None, :] * (W - rtn(W, spec).weight).square()


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("method", ["rtn", "gptq"])
@pytest.mark.parametrize("score", ["sensitivity", "magnitude"])
def test_detached_weights_are_the_top_scoring_ones_kept_in_float16(spec, method, score):
    X, W = inputs(), weights()
    H = 2 * X.T @ X / X.shape[0]
    k = 40
    q = dense_and_sparse(W, spec, k, score=score, H=H, method=method, block_size=96)
    top = expected_scores(W, H, spec, score).flatten().topk(k).indices
    assert q.sparse_idx.tolist() == sorted(top.tolist())
    kept = q.weight.flatten()[q.sparse_idx]
    assert torch.equal(kept, q.sparse) and torch.equal(kept, kept.half().float())  # stored in float16, as used
    if method == "rtn":  # nothing moved them: the original weights, bit for bit
        assert torch.equal(kept, W.flatten()[q.sparse_idx])
    g = spec.group(96)
    zero = q.zero.repeat_interleave(g, 1)[:, :96].flatten()
    assert torch.equal(q.codes.flatten()[q.sparse_idx].float(), zero[q.sparse_idx])  # the dense part holds 0 there


def test_under_gptq_with_no_coupling_the_detached_weights_keep_their_values():
    # a diagonal H passes no error from one column to another, so nothing can move a detached weight
    W = weights()
    H = torch.diag(torch.rand(96, generator=torch.Generator().manual_seed(3)) + 0.5)
    q = dense_and_sparse(W, QuantSpec(3, 32, False), 50, H=H, method="gptq", block_size=32)
    assert torch.equal(q.sparse, W.flatten()[q.sparse_idx])


@pytest.mark.parametrize("spec", SPECS)
def test_the_grids_are_chosen_without_the_detached_weights(spec):
    W = weights()
    q = dense_and_sparse(W, spec, 60, score="magnitude", method="rtn")
    rest = W.flatten().clone()
    rest[q.sparse_idx] = 0.0
    scale, zero = choose_qparams(rest.view_as(W), spec)
    assert torch.equal(q.scale, scale) and torch.equal(q.zero, zero)
    full = rtn(W, spec).scale
    assert (q.scale <= full).all() and (q.scale < full).any()  # the largest weights no longer stretch their grids


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("seed", [0, 1])
def test_output_error_on_calibration_inputs_is_below_the_quantizer_without_detaching(spec, seed):
    X, W = inputs(seed=seed), weights(seed=seed + 10)
    H = 2 * X.T @ X / X.shape[0]
    k = sparse_count(W.numel(), 0.01)
    base = {"rtn": rtn(W, spec), "gptq": gptq(W, H, spec, block_size=96)}
    for method, b in base.items():
        for score in ("sensitivity", "magnitude"):
            q = dense_and_sparse(W, spec, k, score=score, H=H, method=method, block_size=96)
            assert output_error(W, q.weight, X) < output_error(W, b.weight, X), (method, score)


def test_pruned_zeros_are_kept_and_never_detached():
    X, W = inputs(), weights()
    keep = torch.rand(W.shape, generator=torch.Generator().manual_seed(4)) > 0.5
    for method in ("rtn", "gptq"):
        q = dense_and_sparse(W, QuantSpec(3, 32, False), 300, score="magnitude", H=2 * X.T @ X / 1024,
                             method=method, keep=keep, block_size=32)
        assert keep.flatten()[q.sparse_idx].all()
        assert (q.weight[~keep] == 0).all()


def test_average_bits_count_the_sparse_values_and_indices():
    W = weights()
    q = dense_and_sparse(W, QuantSpec(3, 32, False), 61, score="magnitude", method="rtn")
    per_layer = 3 * 64 * 96 + 3 * 64 * (16 + 3) + 61 * (16 + 32)  # codes, 3 groups' scale and zero, sparse part
    assert q.avg_bits * 64 * 96 == pytest.approx(per_layer)
    assert sparse_count(576 * 576, 0.005) == 1659 and sparse_count(100, 0.001) == 1 and sparse_count(100, 0) == 0


def test_dense_sparse_linear_forward_is_linear_with_its_weight():
    X, W, b = inputs(256), weights(), torch.randn(64)
    q = dense_and_sparse(W, QuantSpec(3, 32, False), 80, H=2 * X.T @ X / 256, method="gptq", block_size=32)
    m = quant_module(q, b)
    assert isinstance(m, DenseSparseLinear) and m.weight_sparse.dtype == torch.float16
    assert torch.equal(m.dequantized_weight(), q.weight)
    x = torch.randn(3, 5, 96)
    torch.testing.assert_close(m(x), torch.nn.functional.linear(x, q.weight, b), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(to_linear(m)(x), m(x), rtol=1e-6, atol=1e-6)
    m16 = quant_module(q, b.bfloat16())
    xb = x.bfloat16()
    torch.testing.assert_close(m16(xb).float(), torch.nn.functional.linear(x, q.weight, b), rtol=0.05, atol=0.05)


def test_checkpoint_round_trip_gives_identical_logits_and_converts_to_dense(tmp_path, tokenizer):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from compress.apply import compress_
    from compress.cli import main
    from compress.loading import describe, load
    from compress.saving import save, stock_notes

    model = tiny_model()
    q = {"method": "gptq", "bits": 3, "group_size": 32, "sym": False, "sparse_fraction": 0.01}
    recipe = recipe_from_dict({"steps": [{"quantize": q}], "calib": {"samples": 8, "seqlen": 32}})
    report = compress_(model, recipe, batches(8, 32), progress=False)
    assert all(r["detached"] == sparse_count(r["params"], 0.01) for r in report.layers)
    assert all(r["avg_bits"] == pytest.approx(3 + 19 / 32 + 48 * r["detached"] / r["params"]) for r in report.layers)
    out = save(model, tokenizer, tmp_path / "out")
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config  # stock loaders must not take the dense part alone
    entries = config["compression_config"]["modules"]
    assert len(entries) == 14 and all(e["type"] == "densesparse" and e["sparse"] >= 1 for e in entries.values())
    with safe_open(out / "model.safetensors", "pt") as f:
        name = "model.layers.0.mlp.down_proj"
        assert f.get_tensor(f"{name}.weight_sparse").dtype == torch.float16
        assert f.get_tensor(f"{name}.sparse_idx").dtype == torch.int32
        assert f.get_tensor(f"{name}.sparse_idx").numel() == sparse_count(64 * 128, 0.01)
    assert any("dense-and-sparse" in n and "cannot load" in n for n in stock_notes(model))
    reloaded, _ = load(out)
    ids = torch.randint(0, 300, (2, 20))
    logits = assert_reloaded_equal(model, reloaded, ids)
    rows = [r for r in describe(out) if r["module"].startswith("model.layers.")]
    assert {r["type"] for r in rows if r["module"].endswith("_proj")} == {"densesparse"}
    assert main(["convert", str(out), "--dense", "--out", str(tmp_path / "dense")]) == 0
    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "dense", dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(dense(ids).logits, logits, rtol=1e-4, atol=1e-4)


def test_rtn_with_magnitude_needs_no_data_and_sensitivity_reads_the_hessian():
    from compress import DenseAndSparse, Rtn

    assert Rtn(sparse=DenseAndSparse(0.01, "magnitude")).needs == set()
    assert Rtn(sparse=DenseAndSparse(0.01)).needs == {"xtx"}
    assert Rtn().needs == set()


@pytest.mark.parametrize("quantize, message", [
    ({"sparse_fraction": 0.2}, r"quantize.sparse_fraction must be in \[0, 0.1\]"),
    ({"sparse_fraction": -0.01}, r"quantize.sparse_fraction must be in \[0, 0.1\]"),
    ({"sparse_score": "magnitude"}, "quantize.sparse_score needs sparse_fraction"),
    ({"sparse_fraction": 0.01, "sparse_score": "fisher"}, "sparse_score"),
    ({"method": "awq", "sparse_fraction": 0.01}, "sparse_fraction applies to method gptq or rtn, not awq"),
    ({"method": "leanquant", "group_size": -1, "sparse_fraction": 0.01},
     "applies to method gptq or rtn, not leanquant"),
    ({"sparse_fraction": 0.01, "outlier_fraction": 0.01}, "does not combine with outlier_fraction"),
    ({"sparse_fraction": 0.01, "act_bits": 4}, "does not combine with act_bits"),
    ({"sparse_fraction": 0.01, "hessian": "guided"}, "does not combine with hessian guided"),
    ({"sparse_fraction": 0.01, "allocation": "fisher", "bits_choices": [3, 4], "avg_bits": 3.5},
     "does not combine with allocation fisher"),
])
def test_bad_dense_sparse_keys_are_refused(quantize, message):
    with pytest.raises(ValueError, match=message):
        recipe_from_dict({"steps": [{"quantize": quantize}]})


def test_dense_sparse_cannot_follow_lowrank():
    with pytest.raises(ValueError, match="sparse_fraction.*cannot follow lowrank"):
        recipe_from_dict({"steps": [{"lowrank": {}}, {"quantize": {"method": "rtn", "sparse_fraction": 0.01}}]})
