"""Low-rank factorization: each method is the optimum of its own weighted norm, and factored models
save, load and convert exactly."""

import json

import pytest
import torch
from conftest import make_tokenizer, tiny_model
from torch import nn

from compress.apply import compress_
from compress.layers import LowRankLinear, QuantLinear
from compress.loading import load
from compress.lowrank import damped_cholesky, rank_for, weighted_svd
from compress.recipe import recipe_from_dict
from compress.saving import save, to_dense_


def _problem(seed=0, out=24, inp=32, tokens=400):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out, inp, generator=g)
    mix = torch.randn(inp, inp, generator=g) * torch.logspace(0, -2, inp)  # correlated, anisotropic inputs
    X = torch.randn(tokens, inp, generator=g) @ mix
    return W, X


def _out_err(W, W_new, X):
    return ((W - W_new) @ X.t()).square().sum().item()


def test_plain_svd_is_eckart_young():
    W, _ = _problem()
    W = W.double()
    U, V, S = weighted_svd(W, 5)
    err = lambda U, V: (W - U @ V).square().sum().item()  # noqa: E731
    best = err(U, V)
    assert best == pytest.approx(S[5:].square().sum().item(), rel=1e-6)  # σ comes back in float32
    # stationary in every direction of U and V: the gradients of ‖W − UV‖² are 0
    R = W - U @ V
    assert (R @ V.t()).abs().max() < 1e-10 * W.norm() ** 2 and (U.t() @ R).abs().max() < 1e-10 * W.norm() ** 2
    # and a minimum: nearby rank-5 matrices, moving U, V, both, or the singular values, are all worse
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        dU = 0.01 * torch.randn(U.shape, generator=g, dtype=W.dtype)
        dV = 0.01 * torch.randn(V.shape, generator=g, dtype=W.dtype)
        dS = 1 + 0.01 * torch.randn(5, generator=g, dtype=W.dtype)
        assert best < err(U + dU, V) and best < err(U, V + dV) and best < err(U + dU, V + dV)
        assert best < err(U * dS, V)


def test_whitened_minimizes_the_output_error_and_reports_it():
    W, X = _problem()
    L, _ = damped_cholesky(X.t() @ X, 1e-8)
    U, V, S = weighted_svd(W, 6, right=L)
    whitened = _out_err(W, U @ V, X)
    assert whitened == pytest.approx(S[6:].square().sum().item(), rel=1e-3)
    Us, Vs, _ = weighted_svd(W, 6)
    assert whitened < 0.5 * _out_err(W, Us @ Vs, X)


def test_gfwsvd_minimizes_the_kronecker_fisher_error():
    W, X = _problem(1)
    g = torch.randn(300, W.shape[0]) * torch.logspace(0, -1.5, W.shape[0])
    A, G = X.t() @ X / len(X), g.t() @ g / len(g)

    def kfac_err(Wn):
        D = (W - Wn).double()
        return torch.trace(D @ A.double() @ D.t() @ G.double()).item()

    U, V, S = weighted_svd(W, 6, damped_cholesky(G, 1e-9)[0], damped_cholesky(A, 1e-9)[0])
    best = kfac_err(U @ V)
    assert best == pytest.approx(S[6:].square().sum().item(), rel=1e-3)
    Uw, Vw, _ = weighted_svd(W, 6, right=damped_cholesky(A, 1e-9)[0])  # whitened ignores G
    Us, Vs, _ = weighted_svd(W, 6)
    assert best < kfac_err(Uw @ Vw) and best < kfac_err(Us @ Vs)


def test_diagonal_weights_match_their_objective():
    W, _ = _problem(2)
    rows = torch.logspace(0, 2, W.shape[0])  # FWSVD row importance
    U, V, _ = weighted_svd(W, 4, left=rows.sqrt())
    Us, Vs, _ = weighted_svd(W, 4)
    row_err = lambda Wn: (rows.unsqueeze(1) * (W - Wn).square()).sum()  # noqa: E731
    assert row_err(U @ V) < row_err(Us @ Vs)


def test_rank_keeps_at_most_the_asked_parameters():
    for inp, out, keep in [(576, 576, 0.8), (576, 1536, 0.7), (1536, 576, 0.9), (64, 16, 0.3)]:
        r = rank_for(inp, out, keep)
        assert r * (inp + out) <= keep * inp * out < (r + 1) * (inp + out)


def test_lowrank_linear_forward():
    U, V, b = torch.randn(6, 3), torch.randn(3, 5), torch.randn(6)
    m = LowRankLinear.from_factors(U, V, b)
    x = torch.randn(2, 4, 5)
    assert torch.allclose(m(x), x @ (U @ V).t() + b, atol=1e-5)


def _batches(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, 300, (1, 48), generator=g) for _ in range(n)]


@pytest.mark.parametrize("method", ["svd", "whitened", "asvd", "fwsvd", "gfwsvd"])
def test_factored_model_saves_loads_and_converts(method, tmp_path):
    model, tok = tiny_model(), make_tokenizer()
    ids = _batches(1, 1)[0]
    recipe = recipe_from_dict({"steps": [{"lowrank": {"method": method, "keep": 0.5}}],
                               "calib": {"samples": 4, "seqlen": 48, "score_samples": 4}})
    before = sum(p.numel() for p in model.parameters())
    report = compress_(model, recipe, _batches(), progress=False)
    factored = {n: m for n, m in model.named_modules() if isinstance(m, LowRankLinear)}
    assert len(factored) == 14 and all(r["keep"] <= 0.5 for r in report.layers)
    assert sum(p.numel() for p in model.parameters()) < before
    logits = model(ids).logits
    save(model, tok, tmp_path / "lr")
    config = json.loads((tmp_path / "lr" / "config.json").read_text())
    entry = config["compression_config"]["modules"]["model.layers.0.mlp.down_proj"]
    assert entry == {"type": "lowrank", "rank": factored["model.layers.0.mlp.down_proj"].rank}
    loaded, _ = load(tmp_path / "lr")
    assert torch.equal(loaded(ids).logits, logits)
    to_dense_(loaded)  # what `compress convert --dense` writes: stock Linears holding U·V
    assert not any(isinstance(m, LowRankLinear) for m in loaded.modules())
    assert torch.allclose(loaded(ids).logits, logits, atol=1e-4)


def test_factors_are_quantized_with_their_own_inputs(tmp_path):
    model, tok = tiny_model(), make_tokenizer()
    ids = _batches(1, 1)[0]
    recipe = recipe_from_dict({"steps": [{"lowrank": {"method": "whitened", "keep": 0.5}},
                                         {"quantize": {"method": "gptq", "bits": 4, "group_size": 16}}],
                               "calib": {"samples": 4, "seqlen": 48}})
    compress_(model, recipe, _batches(), progress=False)
    m = model.get_submodule("model.layers.1.mlp.up_proj")
    assert isinstance(m, LowRankLinear) and isinstance(m.u, QuantLinear) and isinstance(m.v, QuantLinear)
    logits = model(ids).logits
    save(model, tok, tmp_path / "lrq")
    loaded, _ = load(tmp_path / "lrq")
    assert torch.equal(loaded(ids).logits, logits)


@pytest.mark.parametrize("steps, message", [
    ([{"lowrank": {"keep": 1.0}}], "keep"),
    ([{"lowrank": {"method": "pca"}}], "method"),
    ([{"lowrank": {}}, {"quantize": {"method": "awq"}}], "awq"),
    ([{"quantize": {}}, {"lowrank": {}}], "order"),
])
def test_bad_lowrank_recipes(steps, message):
    with pytest.raises(ValueError, match=message):
        recipe_from_dict({"steps": steps})


def test_prune_and_lowrank_on_one_linear_is_refused():
    recipe = recipe_from_dict({"steps": [{"prune": {"method": "magnitude"}}, {"lowrank": {"method": "svd"}}]})
    with pytest.raises(ValueError, match="prune and lowrank"):
        compress_(tiny_model(), recipe, None, progress=False)


def test_conv1d_models_factor_too():
    model = tiny_model("gpt2")
    ids = _batches(1, 1)[0]
    recipe = recipe_from_dict({"steps": [{"lowrank": {"method": "whitened", "keep": 0.99}}],
                               "calib": {"samples": 4, "seqlen": 48}})
    before = model(ids).logits
    compress_(model, recipe, _batches(), progress=False)
    assert isinstance(model.transformer.h[0].mlp.c_fc, LowRankLinear)
    assert isinstance(model.transformer.h[0].mlp.c_fc.u, nn.Linear)
    assert torch.isfinite(model(ids).logits).all() and not torch.equal(model(ids).logits, before)


def test_convert_explains_and_dense_is_stock(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from compress.cli import main

    model, tok = tiny_model(), make_tokenizer()
    ids = _batches(1, 1)[0]
    compress_(model, recipe_from_dict({"steps": [{"lowrank": {"method": "svd", "keep": 0.5}}]}), None, progress=False)
    logits = model(ids).logits
    save(model, tok, tmp_path / "lr")
    assert main(["convert", str(tmp_path / "lr"), "--out", str(tmp_path / "same")]) == 0
    assert "stock transformers and vLLM cannot load" in capsys.readouterr().out
    assert main(["convert", str(tmp_path / "lr"), "--out", str(tmp_path / "dense"), "--dense"]) == 0
    assert "stock from_pretrained loads it" in capsys.readouterr().out
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "dense").eval()
    assert torch.allclose(stock(ids).logits, logits, atol=1e-4)
