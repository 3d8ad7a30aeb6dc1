"""Optimal Brain Apoptosis scores: the quadratic term is δᵀHδ of the exact Hessian over every block,
and the second-order prediction is the loss change of removing a (small) unit."""

import pytest
import torch
from conftest import batches, tiny_model
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import AutoModelForCausalLM, LlamaConfig

from compress.apply import compress_
from compress.oba import oba_scores, probe_signs
from compress.recipe import recipe_from_dict
from compress.stream import check_streamable

SAMPLES = batches(3, 20)


def _small(init: float = 0.02) -> torch.nn.Module:
    """2 blocks, 12 MLP channels, 4 heads of 4 in 2 KV groups, float64: every Hessian fits in memory."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=300, hidden_size=16, intermediate_size=12, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         bos_token_id=0, eos_token_id=1, initializer_range=init)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float64).eval()


def _step(unit: str, probes: int, **extra):
    return recipe_from_dict({"steps": [{"structured": {"unit": unit, "score": "oba", "oba_probes": probes,
                                                       **extra}}]}).steps[0]


def _consumer(unit: str) -> str:
    return "mlp.down_proj" if unit == "channels" else "self_attn.o_proj"


def _mean_loss(model, overrides=None) -> torch.Tensor:
    params = {**dict(model.named_parameters()), **(overrides or {})}
    with sdpa_kernel(SDPBackend.MATH):
        return sum(_loss_of(model, params, s) for s in SAMPLES) / len(SAMPLES)


def _loss_of(model, params, ids):
    logits = functional_call(model, params, (ids,), {"use_cache": False}).logits[:, :-1]
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())


def test_probe_signs_are_orthogonal_once_they_cover_the_units():
    S = probe_signs(24, 32, seed=3)
    assert set(S.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(S.t() @ S, 32 * torch.eye(24))
    S = probe_signs(24, 8, seed=3)  # fewer probes: each unit aliases the units sharing π(u) mod 8
    G = S.t() @ S
    assert torch.equal(G.diagonal(), torch.full((24,), 8.0))
    assert ((G.abs() == 8).sum(1) == 3).all() and ((G == 0) | (G.abs() == 8)).all()


@pytest.mark.parametrize("unit, kv_groups, probes, width", [("channels", False, 32, 1), ("heads", False, 8, 4),
                                                            ("heads", True, 4, 8)])
def test_scores_are_the_second_order_taylor_term_of_the_exact_hessian(unit, kv_groups, probes, width):
    """With Hadamard probes covering all units (24 channels, 8 heads or 4 KV groups over both
    blocks), score_u = gᵀδ_u + ½ δ_uᵀHδ_u with H the explicit Hessian over both blocks' consumers."""
    model = _small()
    for p in model.parameters():
        p.requires_grad_(False)
    names = [f"model.layers.{b}.{_consumer(unit)}.weight" for b in range(2)]
    W = [model.get_parameter(n).detach() for n in names]
    scores, metrics = oba_scores(model, _step(unit, probes, kv_groups=kv_groups), SAMPLES, seed=1)
    assert metrics["samples"] == 3 and metrics["probes"] == probes

    def loss(*weights):
        return _mean_loss(model, dict(zip(names, weights)))

    Ws = [w.clone().requires_grad_(True) for w in W]
    g = torch.autograd.grad(loss(*Ws), Ws)
    for b in range(2):
        out, cols = W[b].shape
        with sdpa_kernel(SDPBackend.MATH):  # block b's diagonal block of the Hessian over both consumers
            H_bb = torch.autograd.functional.hessian(lambda w, b=b: loss(*(w if i == b else W[i] for i in range(2))),
                                                     W[b], vectorize=True).reshape(out * cols, out * cols)
        expect = []
        for u in range(cols // width):
            delta = torch.zeros_like(W[b])
            delta[:, u * width:(u + 1) * width] = -W[b][:, u * width:(u + 1) * width]
            d = delta.flatten()
            expect.append((g[b] * delta).sum() + 0.5 * d @ H_bb @ d)
        torch.testing.assert_close(scores[f"model.layers.{b}"].double(), torch.stack(expect), rtol=1e-6, atol=1e-12)


def test_too_few_probes_leave_cross_terms():
    """The same check fails with 8 probes for 24 channels: each estimate keeps the cross terms of
    the units that share its signs."""
    model = _small()
    exact, _ = oba_scores(model, _step("channels", 32), SAMPLES, seed=1)
    rough, _ = oba_scores(model, _step("channels", 8), SAMPLES, seed=1)
    diff = max((exact[k] - rough[k]).abs().max().item() for k in exact)
    assert diff > 1e-3 * max(v.abs().max().item() for v in exact.values())


@pytest.mark.parametrize("unit, block, u", [("channels", 0, 3), ("channels", 1, 7), ("heads", 0, 1), ("heads", 1, 2)])
def test_prediction_is_the_loss_change_of_removing_a_small_unit(unit, block, u):
    """Scale one unit's consumer columns down to 1/16 (a model with curvature: weights of std 0.2):
    removing it changes the loss by the predicted amount to within 5%, and the second-order term
    makes the prediction better than the gradient term alone. (Along δ_u the unit's output falls
    linearly, so the error is the Taylor remainder, third order in the unit's size.)"""
    width = 1 if unit == "channels" else 4
    model = _small(init=0.2)
    W = model.get_submodule(f"model.layers.{block}.{_consumer(unit)}").weight
    cols = slice(u * width, (u + 1) * width)
    with torch.no_grad():
        W[:, cols] /= 16
    scores, _ = oba_scores(model, _step(unit, 32), SAMPLES, seed=0)
    predicted = scores[f"model.layers.{block}"][u].item()
    name = f"model.layers.{block}.{_consumer(unit)}.weight"
    w = W.detach().clone().requires_grad_(True)
    base = _mean_loss(model, {name: w})
    (g,) = torch.autograd.grad(base, w)
    first = -(g[:, cols] * w[:, cols]).sum().item()
    removed = w.detach().clone()
    removed[:, cols] = 0
    with torch.no_grad():
        true = (_mean_loss(model, {name: removed}) - base).item()
    assert abs(predicted - true) <= 0.05 * abs(true)
    assert abs(predicted - true) < abs(first - true)


def test_compress_removes_the_lowest_scores():
    """The channels a recipe with score oba removes are those oba_scores ranks lowest in each block."""
    recipe = recipe_from_dict({"steps": [{"structured": {"unit": "channels", "fraction": 0.25, "score": "oba",
                                                         "oba_probes": 4, "compensate": False}}],
                               "calib": {"samples": 2, "seqlen": 24, "score_samples": 2, "seed": 5}})
    data = batches(2, 24, seed=4)
    ref = tiny_model()
    scores, _ = oba_scores(ref, recipe.steps[0], [row.unsqueeze(0) for ids in data for row in ids], seed=5)
    model = tiny_model()
    report = compress_(model, recipe, data, progress=False)
    assert report.layers[0]["module"] == "model" and report.layers[0]["oba_samples"] == 2
    for b in range(2):
        kept = scores[f"model.layers.{b}"].topk(96).indices.sort().values
        assert torch.equal(model.model.layers[b].mlp.gate_proj.weight, ref.model.layers[b].mlp.gate_proj.weight[kept])


@pytest.mark.parametrize("structured, key", [({"unit": "layers", "score": "oba"}, "structured.score"),
                                             ({"score": "oba", "oba_probes": 3}, "structured.oba_probes"),
                                             ({"score": "oba", "oba_probes": 0}, "structured.oba_probes")])
def test_bad_keys_are_refused(structured, key):
    with pytest.raises(ValueError, match=key):
        recipe_from_dict({"steps": [{"structured": structured}]})


def test_stream_refuses_oba():
    recipe = recipe_from_dict({"steps": [{"structured": {"score": "oba"}}]})
    with pytest.raises(ValueError, match="--stream cannot run steps\\[0\\]: structured score oba"):
        check_streamable(recipe)
