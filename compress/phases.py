"""Where each step's work runs, as data: `phases(step)` lists its phases, and apply.compress_,
the streaming check and the step-order rules read that list.

    model   before the blocks, over the whole dense model (BEFORE_BLOCKS runs them in its order)
    block   on each decoder block, before its Linears are compressed (AWQ and SmoothQuant scales,
            structured removal of channels, heads or experts)
    linear  on each targeted Linear, inside the block's calibration pass (prune, lowrank, quantize)
    after   after the last block (lm_head quantization, distillation's training)

A phase that reads or writes the whole model at once cannot stream (`compress run --stream`).
The whole-model works are the functions of BEFORE_BLOCKS below; each takes the run's state (Run)
and the steps that have that work.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from .allocate import plan_removal, plan_steps
from .calibrate import dense_pass, stack_batches
from .config import Prune, Quantize
from .distill import Distill, distill_, teacher_targets
from .distributed import shard, world
from .experts import expert_linears
from .layers import quant_module
from .lowrank import LowRank
from .maskllm import MaskLlm, learn_masks_
from .model import block_linears, blocks_path, decoder_blocks, final_norm, match, set_module, weight_matrix
from .oba import step_oba
from .quantize import Awq, Rtn, quantize_linear
from .recipe import Recipe, Step
from .rotate import Rotate, rotate_
from .stats import FisherStats, LinearStats, all_reduce_stats_, collect_fisher
from .structured import Structured, remove_layers_, unit_linears

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Phase:
    where: Literal["model", "block", "linear", "after"]
    work: str
    streams: bool = True
    why: str = ""  # what needs the whole model, for the streaming refusal


def phases(step: Step) -> list[Phase]:
    """The phases of one step, in the order they run."""
    match step:
        case Rotate():
            return [Phase("model", "rotate", False, "rotate (a rotation folded into every weight of the model)")]
        case Structured(unit="layers"):
            return [Phase("model", "remove layers", False,
                          "structured layers removal (block influence over all blocks)")]
        case Structured():
            fisher = "fisher" in (step.score, step.allocation)
            why = "structured removal with Fisher scores or allocation (a Fisher pass)"
            return [*([Phase("model", "fisher", False, why)] if fisher else []),
                    *([Phase("model", "plan removal", False, why)] if step.allocation == "fisher" else []),
                    *([Phase("model", "oba", False, "structured score oba (Hessian-vector products through the "
                                                    "whole model)")] if step.score == "oba" else []),
                    Phase("block", "shrink")]
        case MaskLlm():
            return [Phase("model", "maskllm", False,
                          "prune method maskllm (masks trained end to end through the whole model)")]
        case LowRank():
            fisher = step.method in ("fwsvd", "gfwsvd")
            return [*([Phase("model", "fisher", False, f"lowrank {step.method} (a Fisher pass)")] if fisher else []),
                    Phase("linear", "lowrank")]
        case Prune() | Quantize():
            plan = [Phase("model", "plan", False, f"{step.kind} allocation {step.allocation} (plans across layers)")
                    ] if step.allocation != "uniform" else []
            if isinstance(step, Prune):
                return [*plan, Phase("linear", "prune")]
            guided = getattr(step, "guided", None) is not None
            smoothquant = step.act is not None and step.act.smooth == "smoothquant"
            return [*plan,
                    *([Phase("model", "fisher", False, "quantize hessian guided (a gradient pass over the whole "
                                                       "model)")] if guided else []),
                    *([Phase("block", "awq")] if isinstance(step, Awq) else []),
                    *([Phase("block", "smoothquant")] if smoothquant else []),
                    Phase("linear", "quantize"),
                    *([Phase("after", "lm_head", False, "quantize lm_head")] if step.lm_head else [])]
        case Distill():
            why = "distill (the teacher pass and the training run the whole model)"
            return [Phase("model", "teacher", False, why), Phase("after", "distill", False, why)]
    raise TypeError(f"unknown step {step!r}")


def has(step: Step, where: str, work: str | None = None) -> bool:
    return any(p.where == where and work in (None, p.work) for p in phases(step))


def check_streamable(recipe: Recipe) -> None:
    """Refuse, in one line naming it, what needs the whole model at once (evaluation is the CLI's:
    it refuses --eval-data with --stream)."""
    for i, step in enumerate(recipe.steps):
        whole = next((p for p in phases(step) if not p.streams), None)
        if whole is not None:
            raise ValueError(f"--stream cannot run steps[{i}]: {whole.why} needs the whole model at once; "
                             "run without --stream")
    if recipe.needs_data and recipe.calib.source == "self":
        raise ValueError("--stream cannot sample calibration text from the model (calib.source self needs the "
                         "whole model); give a text file")


@dataclass
class Run:
    """What the phases of one compress_ call share."""

    model: nn.Module
    recipe: Recipe
    report: object  # apply.Report
    windows: list[Tensor]  # the calibration windows, [1, T] each
    samples: list[Tensor]  # the first calib.score_samples of them, read by the scoring passes
    batches: list[Tensor] | None
    device: torch.device
    progress: bool
    distill_windows: list[Tensor] | None = None
    stream: object = None
    allocated: dict = field(default_factory=dict)  # (step index, fqn) -> the layer's own step (plan)
    fisher: dict[str, FisherStats] = field(default_factory=dict)
    removal: dict[int, dict[str, int]] = field(default_factory=dict)  # id(step) -> block -> units to remove
    oba: dict = field(default_factory=dict)  # id(step) -> (scores, metrics)
    targets: object = None  # distill's teacher targets


def _teacher(run: Run, steps: list[Distill]) -> None:
    """The dense model's sampled targets, on run.device, before any step changes it."""
    if run.stream is not None or world() > 1:
        raise ValueError("distill trains the whole model in one process: run it without --stream and without torchrun")
    if not run.distill_windows:
        raise ValueError("the distill step needs its windows (distill_windows)")
    home = next(run.model.parameters()).device
    run.targets = teacher_targets(run.model.to(run.device), run.distill_windows, steps[0], progress=run.progress)
    run.model.to(home)


def _rotate(run: Run, steps: list[Rotate]) -> None:
    for step in steps:  # every later step sees the rotated weights
        run.report.add("model", step, rotate_(run.model, step))


def _remove_layers(run: Run, steps: list[Structured]) -> None:
    for step in steps:
        if not run.samples:
            raise ValueError("structured layers removal needs calibration data (block influence)")
        influence = dense_pass(run.model, stack_batches(shard(run.samples), 4), progress=run.progress).influence
        for old in remove_layers_(run.model, step, influence):
            run.report.add(f"{blocks_path(run.model)}.{old}", step, {"removed": 1, "influence": influence[old]})


def _plan(run: Run, steps: list[Step]) -> None:
    run.allocated = plan_steps(run.model, run.recipe.steps, run.batches, score_samples=run.recipe.calib.score_samples,
                              progress=run.progress)


def _fisher(run: Run, steps: list[Step]) -> None:
    """The Fisher that fwsvd, gfwsvd (Kronecker factors), structured fisher scores and GuidedQuant
    (gradient-weighted Hessians) read, from one pass over the dense model's first score_samples windows."""
    model = run.model
    blocks = range(len(decoder_blocks(model)))
    linears = {fqn: m for b in blocks for fqn, m in block_linears(model, b).items()}
    diag, kfac, guided, groups = set(), set(), set(), 1
    for step in steps:
        if isinstance(step, LowRank):
            hit = {f for f in linears if match(f, step.targets, step.ignore)}
            (diag if step.method == "fwsvd" else kfac).update(hit)
        if isinstance(step, Structured):
            for b in blocks:
                prefix = f"{blocks_path(model)}.{b}"
                diag.update(expert_linears(model, prefix) if step.unit == "experts"
                            else unit_linears(model, prefix, step))
        if isinstance(step, Quantize):
            guided.update(f for f in linears if match(f, step.targets, step.ignore))
            groups = step.guided.groups
    if not run.samples:
        raise ValueError("fwsvd, gfwsvd, fisher scores and guided Hessians need calibration data")
    targets = {f: linears[f] for f in sorted(diag | kfac | guided)}
    run.fisher = collect_fisher(model, shard(run.samples), targets, diagonal=bool(diag), kfac=kfac, guided=guided,
                                groups=groups, progress=run.progress)


def _plan_removal(run: Run, steps: list[Structured]) -> None:
    run.removal = {id(s): plan_removal(run.model, s, run.fisher) for s in steps}


def _oba(run: Run, steps: list[Structured]) -> None:
    run.oba = step_oba(run.model, tuple(steps), run.samples, run.recipe.calib.seed, run.progress)
    for step in steps:
        run.report.add("model", step, {f"oba_{k}": v for k, v in run.oba[id(step)][1].items()})


def _maskllm(run: Run, steps: list[MaskLlm]) -> None:
    """Whole-model training on the dense model; the masks are applied after."""
    calib = run.recipe.calib
    for step in steps:
        for fqn, metrics in learn_masks_(run.model, step, run.windows, batch_size=calib.batch_size,
                                         score_windows=calib.score_samples, progress=run.progress,
                                         seed=calib.seed).items():
            run.report.add(fqn, step, {**metrics, "params": weight_matrix(run.model.get_submodule(fqn)).numel()})


# the whole-model works, in the order they run before the first block: the teacher sees the model
# as given, the rotation comes before anything reads weights, the Fisher after layers are removed
BEFORE_BLOCKS: dict[str, Callable[[Run, list], None]] = {
    "teacher": _teacher, "rotate": _rotate, "remove layers": _remove_layers, "plan": _plan, "fisher": _fisher,
    "plan removal": _plan_removal, "oba": _oba, "maskllm": _maskllm,
}


def before_blocks(run: Run) -> None:
    for work, run_work in BEFORE_BLOCKS.items():
        steps = [s for s in run.recipe.steps if has(s, "model", work)]
        if steps:
            run_work(run, steps)


@torch.no_grad()
def quantize_head_(run: Run, step: Quantize, inputs) -> None:
    """Quantize the output head as `step` says, untying it from the input embeddings first.

    GPTQ's statistics are the final norm's outputs on the calibration samples (the head's inputs);
    AWQ has no op before the head to fold scales into, so it rounds to nearest there.
    """
    model = run.model
    head = model.get_output_embeddings()
    fqn = next(n for n, m in model.named_modules() if m is head)
    if head.weight is model.get_input_embeddings().weight:
        head.weight = nn.Parameter(head.weight.detach().clone())
        model.config.tie_word_embeddings = False
    if isinstance(step, Awq):
        step = Rtn(**{k: v for k, v in vars(step).items() if k != "awq_grid"})
    stats = LinearStats()
    if step.needs:
        norm = final_norm(model)
        for h in inputs.hidden:
            stats.update(norm(h), step.needs)
        all_reduce_stats_(stats)
    t = time.perf_counter()
    metrics, qw = quantize_linear(head, step, stats)
    set_module(model, fqn, quant_module(qw, head.bias))
    metrics.update(params=qw.codes.numel(), seconds=time.perf_counter() - t)
    run.report.add(fqn, step, metrics)


def distill_after_(run: Run) -> None:
    """Distillation's training, after the last block, toward the teacher's targets."""
    home = next(run.model.parameters()).device
    run.model.to(run.device)
    run.report.distill = distill_(run.model, run.distill_windows, run.targets, run.recipe.distill,
                                  progress=run.progress)
    run.model.to(home)
