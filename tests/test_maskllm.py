"""MaskLLM: learned masks are exactly 2:4 over the frozen weights and lower the LM loss of the mask
they start from."""

import copy
import json

import pytest
import torch
from conftest import TEXT, tiny_model

from compress import MaskLlm
from compress.cli import main
from compress.maskllm import PATTERNS, hard_mask, init_masks, learn_masks_, prior_logits, soft_mask, targets
from compress.model import weight_matrix
from compress.recipe import recipe_from_dict
from compress.stream import check_streamable


def maskllm(**kw) -> MaskLlm:
    return MaskLlm(sparsity=0.5, pattern="2:4", **kw)


@pytest.fixture(scope="module")
def windows(tokenizer):
    ids = tokenizer(TEXT, return_tensors="pt").input_ids
    return [ids[:, i * 48 : (i + 1) * 48] for i in range(12)]


def lm_loss(model, windows) -> float:
    with torch.no_grad():
        return sum(model(w, labels=w).loss.item() for w in windows) / len(windows)


def test_the_six_candidates_are_every_2_of_4_pattern():
    assert PATTERNS.shape == (6, 4)
    assert (PATTERNS.sum(1) == 2).all()
    assert len({tuple(r.tolist()) for r in PATTERNS}) == 6


def test_the_prior_alone_gives_back_the_init_mask():
    g = torch.Generator().manual_seed(0)
    keep = PATTERNS[torch.randint(0, 6, (8, 5), generator=g)].bool().reshape(8, 20)
    logits = prior_logits(keep, 3.0)
    assert torch.equal(hard_mask(logits), keep)
    # the same pattern leads by one prior over the four sharing one position, by two over the complement
    assert sorted(logits[0, 0].tolist()) == [0.0, 3.0, 3.0, 3.0, 3.0, 6.0]


def test_soft_mask_keeps_two_per_group_and_hardens_at_low_temperature():
    torch.manual_seed(0)
    winner = torch.randint(0, 6, (4, 6, 1))
    logits = torch.zeros(4, 6, 6).scatter_(-1, winner, 50.0)  # a lead far above the Gumbel noise
    soft = soft_mask(logits, 4.0)
    assert torch.allclose(soft.sum(-1), torch.full((4, 6), 2.0))
    assert torch.equal(soft_mask(logits, 0.01).reshape(4, 24).round().bool(), hard_mask(logits))


def test_learned_mask_is_exactly_2of4_and_keeps_the_weights_bit_exact(windows):
    model = tiny_model()
    before = {f: weight_matrix(m).detach().clone() for f, m in targets(model, maskllm()).items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    metrics = learn_masks_(model, maskllm(train_steps=10), windows, batch_size=4)
    assert set(metrics) == set(before) and len(before) == 14
    for fqn, W0 in before.items():
        m = model.get_submodule(fqn)
        assert type(m) is torch.nn.Linear and not hasattr(m, "parametrizations")
        W = weight_matrix(m).detach()
        keep = W != 0
        assert (keep.reshape(W.shape[0], -1, 4).sum(-1) == 2).all()  # every group of 4
        assert torch.equal(W[keep], W0[keep])
        assert metrics[fqn]["sparsity"] == 0.5
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


def test_training_lowers_the_lm_loss_of_the_init_mask_on_the_same_weights(windows):
    base = tiny_model()
    init, trained = copy.deepcopy(base), copy.deepcopy(base)
    first = learn_masks_(init, maskllm(train_steps=0), windows)
    wanda = init_masks(base, maskllm(), windows)
    for fqn, keep in wanda.items():  # zero steps: the Wanda 2:4 mask itself
        assert torch.equal(weight_matrix(init.get_submodule(fqn)) != 0, keep)
        assert first[fqn]["changed"] == 0
    metrics = learn_masks_(trained, maskllm(train_steps=40), windows, batch_size=4)
    assert max(m["changed"] for m in metrics.values()) > 0
    assert lm_loss(trained, windows) < lm_loss(init, windows)


def test_magnitude_init_is_the_magnitude_mask(windows):
    model = tiny_model()
    W0 = {f: weight_matrix(m).detach().clone() for f, m in targets(model, maskllm()).items()}
    learn_masks_(model, maskllm(init="magnitude", train_steps=0), windows)
    for fqn, W in W0.items():
        top = W.abs().reshape(W.shape[0], -1, 4).topk(2, dim=-1).indices
        keep = torch.zeros(W.shape[0], W.shape[1] // 4, 4, dtype=torch.bool).scatter_(-1, top, True)
        assert torch.equal(weight_matrix(model.get_submodule(fqn)) != 0, keep.reshape(W.shape))


@pytest.mark.parametrize("body, message", [
    ({"pattern": "unstructured", "sparsity": 0.5}, "maskllm learns 2:4 masks"),
    ({"train_steps": -1}, "prune.train_steps must be >= 0"),
    ({"lr": 0}, "prune.lr must be > 0"),
    ({"minutes": 0}, "prune.minutes must be > 0"),
    ({"tau_start": 0.01}, "prune.tau_start must be >= tau_end"),
    ({"tau_end": 0}, "prune.tau_end must be > 0"),
    ({"prior": -1}, "prune.prior must be >= 0"),
    ({"init": "sparsegpt"}, "steps[0].prune.init must be one of wanda, magnitude"),
    ({"method": "wanda", "train_steps": 5}, "prune.train_steps applies to method maskllm, not wanda"),
])
def test_bad_maskllm_keys_are_refused(body, message):
    step = {"method": "maskllm", "sparsity": 0.5, "pattern": "2:4", **body}
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace(".", r"\.")):
        recipe_from_dict({"steps": [{"prune": step}]})


@pytest.mark.parametrize("other", [{"lowrank": {"method": "svd"}}, {"structured": {"unit": "channels"}}])
def test_maskllm_refuses_what_it_cannot_combine_with(other):
    steps = [{"prune": {"method": "maskllm", "sparsity": 0.5, "pattern": "2:4"}}, other]
    if "structured" in other:
        steps.reverse()
    with pytest.raises(ValueError, match="maskllm learns its masks on the whole model"):
        recipe_from_dict({"steps": steps})


def test_stream_refuses_maskllm():
    recipe = recipe_from_dict({"steps": [{"prune": {"method": "maskllm", "sparsity": 0.5, "pattern": "2:4"}}]})
    with pytest.raises(ValueError, match="--stream cannot run steps.0.: prune method maskllm"):
        check_streamable(recipe)


def test_a_later_quantize_step_keeps_the_learned_zeros(tiny_dir, text_file, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("steps:\n  - prune: {method: maskllm, sparsity: 0.5, pattern: '2:4', train_steps: 5}\n"
                      "  - quantize: {method: rtn, bits: 4, group_size: 32}\n")
    out = tmp_path / "out"
    assert main(["run", str(recipe), "--model", str(tiny_dir), "--out", str(out), "--calib", str(text_file),
                 "--calib-samples", "4", "--calib-seqlen", "32", "--quiet"]) == 0
    report = json.loads((out / "report.json").read_text())
    pruned = [r for r in report["layers"] if r["step"] == "prune"]
    assert len(pruned) == 14 and all(r["method"] == "maskllm" and r["sparsity"] == 0.5 for r in pruned)
    assert report["sparsity"] == 0.5
    assert all(r["sparsity"] >= 0.5 for r in report["layers"] if r["step"] == "quantize")
