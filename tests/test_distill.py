"""Recovery by distillation (distill.py): unbiased sparse targets, a student that moves toward the
teacher, exact zeros kept, and recipe errors in one line."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_model

from compress import Calib, Distill
from compress.apply import compress_
from compress.data import calibration_batches
from compress.distill import distill_, kd_loss, sample_targets, teacher_targets
from compress.recipe import recipe_from_dict
from compress.stream import check_streamable

PRUNE_24 = {"prune": {"method": "magnitude", "sparsity": 0.5, "pattern": "2:4"}}


def test_sampled_targets_are_an_unbiased_estimate_of_the_teacher_softmax():
    torch.manual_seed(0)
    logits = torch.randn(3, 40) * 2
    n, k = 4000, 16
    ids, counts = sample_targets(logits.repeat(n, 1), k, torch.Generator().manual_seed(0))
    assert ids.dtype == torch.int32 and counts.dtype == torch.uint8
    assert (counts.long().sum(-1) == k).all()
    used = counts > 0  # the occupied slots hold distinct ids
    for row_ids, row_used in zip(ids[:50], used[:50]):
        assert len(set(row_ids[row_used].tolist())) == int(row_used.sum())
    empirical = torch.zeros(3 * n, 40).scatter_add_(1, ids.long(), counts.float() / k).reshape(n, 3, 40).mean(0)
    # each entry is a mean of n·k draws: its standard error is at most 0.5 / sqrt(64000) = 0.002
    torch.testing.assert_close(empirical, logits.softmax(-1), atol=0.01, rtol=0)


def test_kd_loss_is_the_cross_entropy_against_the_sampled_distribution():
    logits = torch.randn(1, 2, 5)
    ids = torch.tensor([[[3, 1, 0], [4, 0, 0]]], dtype=torch.int32)
    counts = torch.tensor([[[2, 1, 0], [3, 0, 0]]], dtype=torch.uint8)
    logq = logits.log_softmax(-1)[0]
    expected = -((2 * logq[0, 3] + logq[0, 1]) / 3 + logq[1, 4]) / 2
    torch.testing.assert_close(kd_loss(logits, ids, counts), expected)


def _sharp_teacher():
    """A random model predicts near-uniformly; a sharper head gives the teacher something to teach."""
    model = tiny_model()
    with torch.no_grad():
        model.lm_head.weight.mul_(40)
    return model


@torch.no_grad()
def _kl(teacher, student, x) -> float:
    p = teacher(x, use_cache=False).logits.log_softmax(-1)
    q = student(x, use_cache=False).logits.log_softmax(-1)
    return float((p.exp() * (p - q)).sum(-1).mean())


@torch.no_grad()
def _loss(student, x, targets) -> float:
    return float(kd_loss(student(x, use_cache=False).logits, targets.ids, targets.counts))


@pytest.mark.parametrize("train", ["kept", "lora"])
def test_distillation_lowers_the_divergence_from_the_teacher_and_keeps_2of4(train, tokenizer, text_file):
    teacher = _sharp_teacher()
    student = copy.deepcopy(teacher)
    calib = Calib(str(text_file), samples=4, seqlen=32)
    compress_(student, recipe_from_dict({"steps": [PRUNE_24]}), progress=False)
    zeros = {n: p == 0 for n, p in student.named_parameters() if "layers" in n and p.dim() == 2}
    step = Distill(steps=60, lr=3e-3 if train == "kept" else 1e-2, train=train, samples_per_token=64, samples=8,
                   seqlen=64, batch_size=4)
    windows = calibration_batches(tokenizer, step.calib(calib.source))
    x = torch.cat(windows)
    before = _kl(teacher, student, x)
    targets = teacher_targets(teacher, windows, step, progress=False)
    loss_before = _loss(student, x, targets)
    figures = distill_(student, windows, targets, step, progress=False)
    assert figures["steps"] == 60 and figures["last_loss"] < figures["first_loss"]
    assert _loss(student, x, targets) < loss_before
    assert _kl(teacher, student, x) < before  # the exact forward KL, not only the sampled estimate
    for name, p in student.named_parameters():
        if name in zeros:
            assert (p[zeros[name]] == 0).all(), name  # pruned positions stay exactly zero
            assert ((p.reshape(-1, 4) == 0).sum(-1) >= 2).all(), name  # 2:4 holds
    assert all(p.requires_grad for p in student.parameters())  # requires_grad as it was before training
    assert student.lm_head.weight.equal(teacher.lm_head.weight)  # only the block Linears train


class _Clock:
    """A fake time.perf_counter for compress.distill that advances only when the model runs a forward:
    by 1 s for each of the teacher's, then by the scripted durations of the training steps."""

    def __init__(self, teacher_calls: int, steps: list[float]):
        self.now, self.durations = 0.0, [1.0] * teacher_calls + steps

    def perf_counter(self) -> float:
        return self.now

    def forward(self, module, args) -> None:
        self.now += self.durations.pop(0)


def test_the_budget_stops_training_and_the_recipe_runs_through_compress(tokenizer, text_file, monkeypatch):
    """The budget is the whole step's, teacher pass included, and training stops before a step as slow
    as the slowest so far would end past it. Teacher: 2 forwards of 1 s, so 12 - 2 = 10 s are left;
    steps take 1, 3, 1, 1, ... s: 6 steps run (the 7th would start at 8 s and might need 3 s)."""
    import compress.distill

    model = _sharp_teacher()
    recipe = recipe_from_dict({"calib": {"source": str(text_file), "samples": 2, "seqlen": 32},
                               "steps": [PRUNE_24, {"distill": {"steps": 100000, "minutes": 12 / 60, "samples": 4,
                                                                "batch_size": 2, "seqlen": 32, "lr": 1e-3}}]})
    clock = _Clock(teacher_calls=2, steps=[1.0, 3.0] + [1.0] * 20)
    monkeypatch.setattr(compress.distill, "time", clock)
    model.register_forward_pre_hook(clock.forward)
    windows = calibration_batches(tokenizer, recipe.distill.calib(recipe.calib.source))
    report = compress_(model, recipe, calibration_batches(tokenizer, recipe.calib), progress=False,
                       distill_windows=windows)
    d = report.distill
    assert d["teacher_seconds"] == 2.0
    # a rule without the teacher's share would run 8 steps; one that stops only past the budget, 9;
    # one that expects the last step's time (1 s) rather than the slowest, 8
    assert d["steps"] == 6 and d["seconds"] == 8.0 and d["total_seconds"] == 10.0  # fake seconds, within the 12
    assert report.sparsity == pytest.approx(0.5)
    with pytest.raises(ValueError, match="distill_windows"):
        compress_(_sharp_teacher(), recipe, calibration_batches(tokenizer, recipe.calib), progress=False)


@pytest.mark.parametrize(("distill", "message"), [
    ({"steps": 0}, "distill.steps must be >= 1"),
    ({"minutes": 0}, "distill.minutes must be > 0"),
    ({"lr": 2.0}, "distill.lr must be in"),
    ({"samples_per_token": 300}, "distill.samples_per_token must be in"),
    ({"train": "full"}, "distill.train must be one of kept, lora"),
    ({"minute": 10}, "unknown key 'minute' (did you mean 'minutes'?)"),
    ({"lora_rank": 0}, "distill.lora_rank must be >= 1"),
])
def test_bad_distill_settings_are_refused_naming_the_key(distill, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("?", r"\?")):
        recipe_from_dict({"steps": [PRUNE_24, {"distill": distill}]})


def test_distill_comes_last_once_and_not_after_quantize_nor_under_stream():
    with pytest.raises(ValueError, match="order rotate, structured, prune, lowrank, quantize, distill"):
        recipe_from_dict({"steps": [{"distill": {}}, PRUNE_24]})
    with pytest.raises(ValueError, match="one distill step"):
        recipe_from_dict({"steps": [PRUNE_24, {"distill": {}}, {"distill": {}}]})
    with pytest.raises(ValueError, match="cannot follow quantize"):
        recipe_from_dict({"steps": [{"quantize": {"method": "rtn"}}, {"distill": {}}]})
    with pytest.raises(ValueError, match="--stream cannot run steps\\[1\\]: distill"):
        check_streamable(recipe_from_dict({"steps": [PRUNE_24, {"distill": {}}]}))
