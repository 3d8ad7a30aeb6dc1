"""The orchestrator: apply a recipe's steps to a model, block by block, in one streaming pass."""

from __future__ import annotations

import ctypes
import logging
import time
from dataclasses import dataclass, field, replace
from functools import partial

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .allocate import plan_steps
from .calibrate import capture_block_inputs, compress_block, stack_batches
from .layers import QuantLinear
from .model import FINAL_NORMS, awq_pairs, block_linears, blocks_path, decoder_blocks, match, set_module, weight_matrix
from .prune import prune_linear
from .quantize import Quantized, awq_smooth_block_, quantize_linear
from .recipe import Prune, Quantize, Recipe, Step
from .stats import LinearStats

log = logging.getLogger(__name__)


@dataclass
class Report:
    """Per-layer metrics of a compression run, in the order layers were compressed."""

    layers: list[dict] = field(default_factory=list)
    seconds: float = 0.0

    def add(self, fqn: str, step: Step, metrics: dict) -> None:
        self.layers.append({"module": fqn, "step": type(step).__name__.lower(), "method": step.method, **metrics})

    @property
    def sparsity(self) -> float:
        """Fraction of zeros left by the prune steps (weighted by layer size); 0 when none ran."""
        rows = [r for r in self.layers if r["step"] == "prune"]
        total = sum(r["params"] for r in rows)
        return sum(r["sparsity"] * r["params"] for r in rows) / total if total else 0.0


def apply_step(step: Step, linear: nn.Module, stats: LinearStats) -> tuple[dict, Quantized | None]:
    """Apply one step to one Linear in place: (metrics, the codes when the step quantized it)."""
    match step:
        case Prune():
            return prune_linear(linear, step, stats), None
        case Quantize():
            return quantize_linear(linear, step, stats)
    raise TypeError(f"unknown step {step!r}")


def targeted(linears: dict[str, nn.Module], steps: tuple[Step, ...],
             allocated: dict[tuple[int, str], Step] | None = None) -> dict[str, list[Step]]:
    """fqn -> the steps whose targets/ignore globs select it (Linears no step selects are left out),
    each replaced by its per-layer version where `allocated` (allocate.plan_steps) has one."""
    allocated = allocated or {}
    plan = {fqn: [allocated.get((i, fqn), s) for i, s in enumerate(steps) if match(fqn, s.targets, s.ignore)]
            for fqn in linears}
    for fqn, selected in plan.items():
        if sum(isinstance(s, Quantize) for s in selected) > 1:
            raise ValueError(f"{fqn} is targeted by more than one quantize step")
    return {fqn: s for fqn, s in plan.items() if s}


def compress_(
    model: nn.Module,
    recipe: Recipe,
    batches: list[Tensor] | None = None,
    *,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> Report:
    """Apply recipe.steps to the Linears of every decoder block, in place; returns the metrics.

    Steps that need input statistics stream the calibration `batches` through the model one block
    at a time (calibrate.compress_block); calibration-free steps (magnitude) need no data.
    """
    t0 = time.perf_counter()
    report = Report()
    blocks = decoder_blocks(model)
    needs = recipe.needs
    home = next(model.parameters()).device
    device = torch.device(device) if device is not None else home
    inputs = None
    release_free_memory()
    allocated = plan_steps(model, recipe, batches, progress=progress)
    release_free_memory()
    if needs:
        if not batches:
            raise ValueError("this recipe needs calibration data, but no batches were given")
        inputs = capture_block_inputs(model, stack_batches(batches, recipe.calib.batch_size), home)
        inputs.hidden = [h.to(device) for h in inputs.hidden]
    bar = tqdm(range(len(blocks)), desc="compress", unit="block", disable=not progress)
    for i in bar:
        block = blocks[i].to(device)
        plan = targeted(block_linears(model, i), recipe.steps, allocated)
        linears = {fqn: model.get_submodule(fqn) for fqn in plan}
        first = len(report.layers)
        quantized: dict[str, Quantized] = {}
        compress = partial(_compress_linear, report, plan, linears, quantized)
        for step in recipe.steps:
            if isinstance(step, Quantize) and step.method == "awq":
                prefix = f"{blocks_path(model)}.{i}"
                alphas = awq_smooth_block_(block, prefix, awq_pairs(model), inputs, step)
                log.info("block %d awq alphas: %s", i, alphas)
        if inputs is not None:
            inputs.hidden = compress_block(block, inputs, linears, needs, compress)
        else:
            for fqn in linears:
                compress(fqn, LinearStats())
        for fqn, qw in quantized.items():  # pack now: no sample runs this block any more
            set_module(model, fqn, QuantLinear.from_quantized(qw, linears[fqn].bias))
        blocks[i].to(home)
        release_free_memory()
        errors = [r["error"] for r in report.layers[first:]]
        if errors:
            bar.set_postfix(err=f"{sum(errors) / len(errors):.4f}", max_err=f"{max(errors):.4f}")
    for step in recipe.steps:
        if isinstance(step, Quantize) and step.lm_head:
            _quantize_head_(model, step, inputs, report)
    report.seconds = time.perf_counter() - t0
    return report


@torch.no_grad()
def _quantize_head_(model: nn.Module, step: Quantize, inputs, report: Report) -> None:
    """Quantize the output head as `step` says, untying it from the input embeddings first.

    GPTQ's statistics are the final norm's outputs on the calibration samples (the head's inputs);
    AWQ has no op before the head to fold scales into, so it rounds to nearest there.
    """
    head = model.get_output_embeddings()
    fqn = next(n for n, m in model.named_modules() if m is head)
    if head.weight is model.get_input_embeddings().weight:
        head.weight = nn.Parameter(head.weight.detach().clone())
        model.config.tie_word_embeddings = False
    step = replace(step, method="rtn") if step.method == "awq" else step
    stats = LinearStats()
    if step.needs:
        norm = model.get_submodule(FINAL_NORMS[model.config.model_type])
        for h in inputs.hidden:
            stats.update(norm(h), step.needs)
    t = time.perf_counter()
    metrics, qw = quantize_linear(head, step, stats)
    set_module(model, fqn, QuantLinear.from_quantized(qw, head.bias))
    metrics.update(params=qw.codes.numel(), seconds=time.perf_counter() - t)
    report.add(fqn, step, metrics)


def _compress_linear(report: Report, plan: dict, linears: dict, quantized: dict, fqn: str, stats: LinearStats) -> None:
    """Apply the planned steps to one Linear, in recipe order, and record their metrics."""
    for step in plan[fqn]:
        t = time.perf_counter()
        metrics, qw = apply_step(step, linears[fqn], stats)
        if qw is not None:
            quantized[fqn] = qw
        metrics.update(params=weight_matrix(linears[fqn]).numel(), seconds=time.perf_counter() - t)
        report.add(fqn, step, metrics)
        log.info("%s %s: %s", fqn, step.method, _fmt(metrics))


def release_free_memory() -> None:
    """Hand freed heap pages back to the OS (glibc malloc_trim; a no-op elsewhere).

    Tensors freed between blocks otherwise stay resident in glibc's heap, fragmented, and the
    next block's activations grow it further, so peak RSS climbs well above live memory.
    """
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _fmt(metrics: dict) -> str:
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
