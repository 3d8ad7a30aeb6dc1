"""The orchestrator: apply a recipe's steps to a model, block by block, in one streaming pass."""

from __future__ import annotations

import ctypes
import logging
import time
from dataclasses import dataclass, field, replace
from functools import partial
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .actquant import smoothquant_block_, with_act_quant
from .allocate import plan_steps
from .calibrate import capture_block_inputs, compress_block, dense_pass, stack_batches
from .distill import distill_, teacher_targets
from .distributed import check_same, shard, world
from .grid import Quantized
from .layers import LowRankLinear, QuantLinear, quant_module
from .lowrank import lowrank_linear
from .maskllm import learn_masks_
from .model import (
    FINAL_NORMS,
    awq_pairs,
    block_linears,
    blocks_path,
    decoder_blocks,
    match,
    set_module,
    set_weight_matrix_,
    weight_matrix,
)
from .oba import step_oba
from .prune import prune_linear
from .quantize import awq_smooth_block_, quantize_linear
from .recipe import Distill, LowRank, Prune, Quantize, Recipe, Rotate, Step, Structured
from .rotate import rotate_
from .stats import FisherStats, LinearStats, all_reduce_stats_, collect_fisher
from .structured import keep_count, plan_removal, remove_layers_, shrink_block_, unit_linears, units_of, update_config_

if TYPE_CHECKING:
    from .stream import BlockStream

log = logging.getLogger(__name__)


@dataclass
class Report:
    """Per-layer metrics of a compression run, in the order layers were compressed."""

    layers: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    distill: dict = field(default_factory=dict)  # distill.distill_'s figures, when the recipe distills

    def add(self, fqn: str, step: Step, metrics: dict) -> None:
        method = f"{step.unit}/{step.score}" if isinstance(step, Structured) else step.method
        self.layers.append({"module": fqn, "step": type(step).__name__.lower(), "method": method, **metrics})

    @property
    def sparsity(self) -> float:
        """Fraction of zeros left by the prune steps (weighted by layer size); 0 when none ran."""
        rows = [r for r in self.layers if r["step"] == "prune"]
        total = sum(r["params"] for r in rows)
        return sum(r["sparsity"] * r["params"] for r in rows) / total if total else 0.0


def apply_step(step: Step, linear: nn.Module, stats: LinearStats, fisher: FisherStats | None = None,
               done: Quantized | Factors | None = None) -> tuple[dict, Quantized | Factors | None]:
    """Apply one step to one Linear in place: (metrics, what the new module is built from after the
    block: the codes when it was quantized, the factors when it was factored). `done` is what an
    earlier step on the same Linear returned (a quantize step after lowrank quantizes the factors)."""
    match step:
        case Prune():
            return prune_linear(linear, step, stats), None
        case LowRank():
            metrics, (U, V) = lowrank_linear(linear, step, stats, fisher)
            return metrics, Factors(U, V)
        case Quantize() if isinstance(done, Factors):
            return quantize_factors(linear, step, stats, done)
        case Quantize():
            return quantize_linear(linear, step, stats, fisher)
    raise TypeError(f"unknown step {step!r}")


@dataclass
class Factors:
    """U [out, r], V [r, in] of a factored Linear, with their codes once quantized."""

    U: Tensor
    V: Tensor
    qu: Quantized | None = None
    qv: Quantized | None = None

    def module(self, bias: Tensor | None, dtype: torch.dtype) -> LowRankLinear:
        m = LowRankLinear.from_factors(self.U, self.V, bias, dtype)
        if self.qv is not None:
            m.v = QuantLinear.from_quantized(self.qv)
            m.u = QuantLinear.from_quantized(self.qu, m.u.bias)
        return m


@torch.no_grad()
def quantize_factors(linear: nn.Module, step: Quantize, stats: LinearStats, f: Factors) -> tuple[dict, Factors]:
    """Quantize both factors of a factored Linear: v on the Linear's own inputs, then u on v's
    quantized outputs, whose XᵀX is V̂ (XᵀX) V̂ᵀ exactly. The Linear's weight becomes Û·V̂."""
    v = nn.Linear(f.V.shape[1], f.V.shape[0], bias=False, dtype=torch.float32)
    v.weight.copy_(f.V)
    metrics_v, qv = quantize_linear(v, step, stats)
    u_stats = LinearStats(n_tokens=stats.n_tokens)
    if stats.xtx_upper is not None:
        u_stats.xtx_upper = v.weight @ stats.xtx @ v.weight.t()  # full symmetric: LinearStats.xtx reads it back
    u = nn.Linear(f.U.shape[1], f.U.shape[0], bias=False, dtype=torch.float32)
    u.weight.copy_(f.U)
    metrics_u, qu = quantize_linear(u, step, u_stats)
    set_weight_matrix_(linear, u.weight @ v.weight)
    metrics = {"bits": metrics_v["bits"], "group_size": metrics_v["group_size"],
               "error": max(metrics_u["error"], metrics_v["error"])}
    damps = [m["damp"] for m in (metrics_u, metrics_v) if "damp" in m]
    if damps:
        metrics["damp"] = max(damps)
    return metrics, Factors(f.U, f.V, qu, qv)


def targeted(linears: dict[str, nn.Module], steps: tuple[Step, ...],
             allocated: dict[tuple[int, str], Step] | None = None) -> dict[str, list[Step]]:
    """fqn -> the steps whose targets/ignore globs select it (Linears no step selects are left out),
    each replaced by its per-layer version where `allocated` (allocate.plan_steps) has one."""
    allocated = allocated or {}
    plan = {fqn: [allocated.get((i, fqn), s) for i, s in enumerate(steps)
                  if isinstance(s, Prune | LowRank | Quantize) and not _learned(s)
                  and match(fqn, s.targets, s.ignore)]
            for fqn in linears}
    for fqn, selected in plan.items():
        if sum(isinstance(s, Quantize) for s in selected) > 1:
            raise ValueError(f"{fqn} is targeted by more than one quantize step")
        if sum(isinstance(s, LowRank) for s in selected) > 1 or (
                any(isinstance(s, LowRank) for s in selected) and any(isinstance(s, Prune) for s in selected)):
            raise ValueError(f"{fqn} is targeted by more than one lowrank step, or by prune and lowrank")
    return {fqn: s for fqn, s in plan.items() if s}


def _learned(step: Step) -> bool:
    """A MaskLLM prune step: its masks are applied before the streaming pass (maskllm.py)."""
    return isinstance(step, Prune) and step.method == "maskllm"


def check_shapes(model: nn.Module, recipe: Recipe) -> None:
    """Refuse, before any block is compressed, a step that cannot apply to a Linear it targets: a
    quantization group wider than the Linear's inputs, an N:M pattern whose M does not divide them,
    or a channel multiple so coarse that rounding leaves the MLPs whole."""
    widths = {fqn: weight_matrix(m).shape[1] for b in range(len(decoder_blocks(model)))
              for fqn, m in block_linears(model, b).items()}
    for step in recipe.steps:
        if isinstance(step, Structured) and step.unit == "channels" and step.multiple > 1:
            consumer = f"{blocks_path(model)}.0.{units_of(model)['mlp_out']}"
            width = widths[consumer]
            if keep_count(width, step.fraction, step.multiple) == width:
                raise ValueError(f"structured.multiple {step.multiple} rounds {step.fraction:.0%} of the {width} MLP "
                                 f"channels of {consumer.rsplit('.', 1)[0]} to none removed; use a smaller multiple")
        if not isinstance(step, Prune | Quantize):
            continue
        hit = {fqn: w for fqn, w in widths.items() if match(fqn, step.targets, step.ignore)}
        if isinstance(step, Quantize) and step.lm_head:
            head = model.get_output_embeddings()
            hit[next(n for n, m in model.named_modules() if m is head)] = weight_matrix(head).shape[1]
        for fqn, width in hit.items():
            if isinstance(step, Quantize) and step.group_size > width:
                raise ValueError(f"quantize.group_size {step.group_size} is larger than the {width} inputs of {fqn}; "
                                 f"use a group size of at most {width}, -1 (one group per row), or ignore the layer")
            if isinstance(step, Prune) and step.n_m is not None and width % step.n_m[1]:
                raise ValueError(f"prune.pattern {step.pattern} needs a multiple of {step.n_m[1]} inputs, but {fqn} "
                                 f"has {width}; ignore the layer or use another pattern")


def compress_(
    model: nn.Module,
    recipe: Recipe,
    batches: list[Tensor] | None = None,
    *,
    device: torch.device | str | None = None,
    progress: bool = True,
    stream: BlockStream | None = None,
    distill_windows: list[Tensor] | None = None,
) -> Report:
    """Apply recipe.steps to the Linears of every decoder block, in place; returns the metrics.

    Steps that need input statistics stream the calibration `batches` through the model one block
    at a time (calibrate.compress_block); calibration-free steps (magnitude) need no data.

    Under torchrun every rank passes the same `batches`; each runs its share of the windows and
    the statistics are all-reduced (compress.distributed), so every rank ends with the same model.

    With `stream` (stream.BlockStream), blocks live on the meta device until `stream.load_block`
    reads them, and `stream.finish_block` writes and releases each one, so memory holds one block;
    a resumed stream starts at its first unfinished block with the metrics of the finished ones.

    A distill step (distill.py) runs the dense model over `distill_windows` ([1, T] each, from
    data.calibration_batches(tok, step.calib(recipe.calib.source))) before any step, and trains
    the compressed model toward those targets after the last block.
    """
    t0 = time.perf_counter()
    check_shapes(model, recipe)
    report = Report(list(stream.rows) if stream is not None else [])
    needs = recipe.needs
    home = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    act_dtype = dtype if recipe.calib.activation_dtype == "model" else getattr(torch, recipe.calib.activation_dtype)
    device = torch.device(device) if device is not None else home
    windows = [row.unsqueeze(0) for ids in batches or [] for row in ids]
    check_same(windows)
    samples = windows[: recipe.calib.score_samples]  # the scoring passes shard these in turn
    targets = _teacher(model, recipe.distill, distill_windows, device, stream, progress)
    release_free_memory()
    for step in recipe.steps:
        if isinstance(step, Rotate):  # first: every later step sees the rotated weights
            report.add("model", step, rotate_(model, step))
        if isinstance(step, Structured) and step.unit == "layers":
            if not samples:
                raise ValueError("structured layers removal needs calibration data (block influence)")
            influence = dense_pass(model, stack_batches(shard(samples), 4), progress=progress).influence
            for old in remove_layers_(model, step, influence):
                report.add(f"{blocks_path(model)}.{old}", step, {"removed": 1, "influence": influence[old]})
    shrink = [s for s in recipe.steps if isinstance(s, Structured) and s.unit != "layers"]
    blocks = decoder_blocks(model)
    allocated = plan_steps(model, recipe, batches, progress=progress)
    fisher = step_fisher(model, recipe, samples, progress)
    removal = {id(s): plan_removal(model, s, fisher) for s in shrink if s.allocation == "fisher"}
    oba = step_oba(model, recipe.steps, samples, recipe.calib.seed, progress)
    for step in shrink:
        if id(step) in oba:
            report.add("model", step, {f"oba_{k}": v for k, v in oba[id(step)][1].items()})
    for step in filter(_learned, recipe.steps):  # whole-model training on the dense model, masks applied after
        for fqn, metrics in learn_masks_(model, step, windows, batch_size=recipe.calib.batch_size,
                                         score_windows=recipe.calib.score_samples, progress=progress,
                                         seed=recipe.calib.seed).items():
            report.add(fqn, step, {**metrics, "params": weight_matrix(model.get_submodule(fqn)).numel()})
    release_free_memory()
    inputs = None
    if needs or any(s.needs_data for s in shrink):
        if not batches:
            raise ValueError("this recipe needs calibration data, but no batches were given")
        inputs = capture_block_inputs(model, stack_batches(shard(windows), recipe.calib.batch_size), home)
        inputs.hidden = [h.to(device, act_dtype) for h in inputs.hidden]
    bar = tqdm(range(stream.first if stream else 0, len(blocks)), desc="compress", unit="block",
               disable=not progress, initial=stream.first if stream else 0, total=len(blocks))
    for i in bar:
        if stream is not None:
            hidden = stream.load_block(i, inputs.hidden if inputs is not None else None)
            if inputs is not None:
                inputs.hidden = hidden
        block = blocks[i].to(device)
        if inputs is not None:
            _cast_(inputs.hidden, device, dtype)
        prefix = f"{blocks_path(model)}.{i}"
        first = len(report.layers)
        for step in shrink:
            unit = "mlp" if step.unit == "channels" else "self_attn"
            n_remove = removal[id(step)][prefix] if id(step) in removal else None
            scores = oba[id(step)][0][prefix] if id(step) in oba else None
            report.add(f"{prefix}.{unit}", step, shrink_block_(model, prefix, step, inputs, fisher, n_remove, scores))
        plan = targeted(block_linears(model, i), recipe.steps, allocated)
        linears = {fqn: model.get_submodule(fqn) for fqn in plan}
        done: dict[str, Quantized | Factors] = {}
        compress = partial(_compress_linear, report, plan, linears, fisher, done)
        for step in recipe.steps:
            if isinstance(step, Quantize) and step.method == "awq":
                alphas = awq_smooth_block_(block, prefix, awq_pairs(model), inputs, step)
                log.info("block %d awq alphas: %s", i, alphas)
            if isinstance(step, Quantize) and step.smooth == "smoothquant":
                log.info("block %d smoothquant max s: %s", i,
                         smoothquant_block_(block, prefix, awq_pairs(model), inputs, step))
        if inputs is not None:
            inputs.hidden = compress_block(block, inputs, linears, needs, compress, low_memory=stream is not None)
        else:
            for fqn in linears:
                compress(fqn, LinearStats())
        _swap_modules_(model, linears, done, plan)  # now: no sample runs this block any more
        del linears, done, compress  # the replaced Linears' weights: not kept past the block
        blocks[i].to(home)
        if inputs is not None:
            _cast_(inputs.hidden, device, act_dtype)
        if stream is not None:
            hidden = stream.finish_block(i, inputs.hidden if inputs is not None else None, report.layers)
            if inputs is not None:
                inputs.hidden = hidden
        release_free_memory()
        errors = [r["error"] for r in report.layers[first:] if "error" in r]
        if errors:
            bar.set_postfix(err=f"{sum(errors) / len(errors):.4f}", max_err=f"{max(errors):.4f}")
    if shrink:
        update_config_(model)
    for step in recipe.steps:
        if isinstance(step, Quantize) and step.lm_head:
            _quantize_head_(model, step, inputs, report)
    if targets is not None:
        del inputs
        release_free_memory()
        model.to(device)
        report.distill = distill_(model, distill_windows, targets, recipe.distill, progress=progress)
        model.to(home)
    report.seconds = time.perf_counter() - t0
    return report


def _teacher(model: nn.Module, step: Distill | None, windows: list[Tensor] | None, device: torch.device,
             stream: BlockStream | None, progress: bool):
    """The dense model's sampled targets for a distill step (None without one), on `device`."""
    if step is None:
        return None
    if stream is not None or world() > 1:
        raise ValueError("distill trains the whole model in one process: run it without --stream and without torchrun")
    if not windows:
        raise ValueError("the distill step needs its windows (distill_windows)")
    home = next(model.parameters()).device
    targets = teacher_targets(model.to(device), windows, step, progress=progress)
    model.to(home)
    return targets


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
        all_reduce_stats_(stats)
    t = time.perf_counter()
    metrics, qw = quantize_linear(head, step, stats)
    set_module(model, fqn, quant_module(qw, head.bias))
    metrics.update(params=qw.codes.numel(), seconds=time.perf_counter() - t)
    report.add(fqn, step, metrics)


def step_fisher(model: nn.Module, recipe: Recipe, samples: list[Tensor], progress: bool) -> dict[str, FisherStats]:
    """The Fisher that fwsvd, gfwsvd (Kronecker factors), structured fisher scores and GuidedQuant
    (gradient-weighted Hessians) read, from one pass over the dense model's first score_samples
    windows; {} when no step reads it."""
    linears = {fqn: m for b in range(len(decoder_blocks(model))) for fqn, m in block_linears(model, b).items()}
    diag, kfac, guided, groups = set(), set(), set(), 1
    for step in recipe.steps:
        if isinstance(step, LowRank) and step.method in ("fwsvd", "gfwsvd"):
            hit = {f for f in linears if match(f, step.targets, step.ignore)}
            (diag if step.method == "fwsvd" else kfac).update(hit)
        if isinstance(step, Structured) and "fisher" in (step.score, step.allocation):
            for b in range(len(decoder_blocks(model))):
                diag.update(unit_linears(model, f"{blocks_path(model)}.{b}", step))
        if isinstance(step, Quantize) and step.hessian == "guided":
            guided.update(f for f in linears if match(f, step.targets, step.ignore))
            groups = step.guided_groups
    if not diag | kfac | guided:
        return {}
    if not samples:
        raise ValueError("fwsvd, gfwsvd, fisher scores and guided Hessians need calibration data")
    targets = {f: linears[f] for f in sorted(diag | kfac | guided)}
    return collect_fisher(model, shard(samples), targets, diagonal=bool(diag), kfac=kfac, guided=guided,
                          groups=groups, progress=progress)


def _compress_linear(report: Report, plan: dict, linears: dict, fisher: dict, done: dict, fqn: str,
                     stats: LinearStats) -> None:
    """Apply the planned steps to one Linear, in recipe order, and record their metrics."""
    for step in plan[fqn]:
        t = time.perf_counter()
        try:
            metrics, result = apply_step(step, linears[fqn], stats, fisher.get(fqn), done.get(fqn))
        except ValueError as e:
            raise ValueError(f"{fqn} ({type(step).__name__.lower()} {step.method}): {e}") from None
        if "damp" in metrics:
            log.warning("%s: %s raised the damping from %g to %g (not positive definite with the first)",
                        fqn, step.method, step.damp, metrics["damp"])
        if result is not None:
            done[fqn] = result
        metrics.update(params=weight_matrix(linears[fqn]).numel(), seconds=time.perf_counter() - t)
        report.add(fqn, step, metrics)
        log.info("%s %s: %s", fqn, step.method, _fmt(metrics))


def _swap_modules_(model: nn.Module, linears: dict[str, nn.Module], done: dict, plan: dict) -> None:
    """Put each compressed Linear's new module (quantized, low rank) into the model."""
    for fqn, result in done.items():
        old = linears[fqn]
        new = (result.module(old.bias, weight_matrix(old).dtype) if isinstance(result, Factors)
               else with_act_quant(quant_module(result, old.bias), plan[fqn]))
        set_module(model, fqn, new)


def _cast_(hidden: list[Tensor], device: torch.device, dtype: torch.dtype) -> None:
    """Move the hidden states to `device` and `dtype` in place, one at a time (never two full copies)."""
    for j, h in enumerate(hidden):
        hidden[j] = h.to(device, dtype)


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
