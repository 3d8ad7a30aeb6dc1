"""The orchestrator: apply a recipe's steps to a model, block by block, in one streaming pass."""

from __future__ import annotations

import ctypes
import logging
import time
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .actquant import with_act_quant
from .calibrate import capture_block_inputs, compress_block, stack_batches
from .config import Prune, Quantize
from .distributed import check_same, shard
from .experts import check_experts, remove_experts_, update_expert_config_
from .fpquant import BLOCK, FORMATS, shared_global_scales
from .grid import Quantized
from .layers import LowRankLinear, QuantLinear, quant_module
from .lowrank import LowRank, lowrank_linear
from .model import (
    architecture,
    awq_pairs,
    block_linears,
    blocks_path,
    decoder_blocks,
    match,
    set_module,
    set_weight_matrix_,
    weight_matrix,
)
from .moe import Coverage
from .phases import Run, before_blocks, distill_after_, has, quantize_head_
from .prune import prune_linear
from .quantize import quantize_linear
from .recipe import Recipe, Step
from .smooth import awq_smooth_block_, smoothquant_block_
from .stats import FisherStats, LinearStats
from .structured import Structured, keep_count, shrink_block_, units_of, update_config_

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
        self.layers.append({"module": fqn, "step": step.kind, "method": method, **metrics})

    @property
    def sparsity(self) -> float:
        """Fraction of zeros left by the prune steps (weighted by layer size); 0 when none ran."""
        rows = [r for r in self.layers if r["step"] == "prune"]
        total = sum(r["params"] for r in rows)
        return sum(r["sparsity"] * r["params"] for r in rows) / total if total else 0.0


def apply_step(step: Step, linear: nn.Module, stats: LinearStats, fisher: FisherStats | None = None,
               done: Quantized | Factors | None = None, global_scale: Tensor | None = None
               ) -> tuple[dict, Quantized | Factors | None]:
    """Apply one step to one Linear in place: (metrics, what the new module is built from after the
    block: the codes when it was quantized, the factors when it was factored). `done` is what an
    earlier step on the same Linear returned (a quantize step after lowrank quantizes the factors);
    `global_scale` the NVFP4 one it shares with its fused siblings."""
    match step:
        case Prune():
            return prune_linear(linear, step, stats), None
        case LowRank():
            metrics, (U, V) = lowrank_linear(linear, step, stats, fisher)
            return metrics, Factors(U, V)
        case Quantize() if isinstance(done, Factors):
            return quantize_factors(linear, step, stats, done)
        case Quantize():
            return quantize_linear(linear, step, stats, fisher, global_scale)
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
    plan = {fqn: [allocated.get((i, fqn), s) for i, s in enumerate(steps)  # None: allocated nothing
                  if has(s, "linear") and match(fqn, s.targets, s.ignore) and allocated.get((i, fqn), s) is not None]
            for fqn in linears}
    for fqn, selected in plan.items():
        if sum(isinstance(s, Quantize) for s in selected) > 1:
            raise ValueError(f"{fqn} is targeted by more than one quantize step")
        if sum(isinstance(s, LowRank) for s in selected) > 1 or (
                any(isinstance(s, LowRank) for s in selected) and any(isinstance(s, Prune) for s in selected)):
            raise ValueError(f"{fqn} is targeted by more than one lowrank step, or by prune and lowrank")
    return {fqn: s for fqn, s in plan.items() if s}


def check_shapes(model: nn.Module, recipe: Recipe) -> None:
    """Refuse, before any block is compressed, a step that cannot apply to a Linear it targets: a
    quantization group wider than the Linear's inputs, an N:M pattern whose M does not divide them,
    or a channel multiple so coarse that rounding leaves the MLPs whole."""
    widths = {fqn: weight_matrix(m).shape[1] for b in range(len(decoder_blocks(model)))
              for fqn, m in block_linears(model, b).items()}
    for step in recipe.steps:
        if isinstance(step, Structured) and step.unit == "experts":
            check_experts(model, step)
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
            formats = ((step.format,) if step.format != "int" else step.budget.formats if step.budget else ()
                       ) if isinstance(step, Quantize) else ()
            for f in formats:
                if f in FORMATS and FORMATS[f].element == "e2m1" and width % FORMATS[f].group:
                    raise ValueError(f"quantize.format {f} needs a multiple of {FORMATS[f].group} inputs, but {fqn} "
                                     f"has {width}; ignore the layer or use another format")
            if isinstance(step, Quantize) and step.act_format == "fp8-group" and width % BLOCK:
                # compressed-tensors and vLLM split each token into whole groups of 128
                raise ValueError(f"quantize.act_format fp8-group needs a multiple of {BLOCK} inputs, but {fqn} has "
                                 f"{width}; use act_format fp8-token, or ignore the layer")
            if formats:
                continue
            elif isinstance(step, Quantize) and step.group_size > width:
                raise ValueError(f"quantize.group_size {step.group_size} is larger than the {width} inputs of {fqn}; "
                                 f"use a group size of at most {width}, -1 (one group per row), or ignore the layer")
            if isinstance(step, Prune) and step.n_m is not None and width % step.n_m[1]:
                raise ValueError(f"prune.pattern {step.pattern} needs a multiple of {step.n_m[1]} inputs, but {fqn} "
                                 f"has {width}; ignore the layer or use another pattern")


def compress_(
    model: nn.Module,
    recipe: Recipe | Step,
    batches: list[Tensor] | None = None,
    *,
    device: torch.device | str | None = None,
    progress: bool = True,
    stream: BlockStream | None = None,
    distill_windows: list[Tensor] | None = None,
) -> Report:
    """Apply a recipe's steps (or one step: `compress_(model, Gptq(bits=4), batches)`) to the
    Linears of every decoder block, in place; returns the metrics.

    The steps' phases (phases.py) say what runs where: the whole-model works first
    (phases.before_blocks), then block by block the block-level works and, on each targeted Linear,
    the Linear-level steps, with input statistics from the calibration `batches` streamed through
    one block at a time (calibrate.compress_block); then the works after the blocks.

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
    recipe = recipe if isinstance(recipe, Recipe) else Recipe(steps=(recipe,))
    check_shapes(model, recipe)
    report = Report(list(stream.rows) if stream is not None else [])
    home = next(model.parameters()).device
    device = torch.device(device) if device is not None else home
    windows = [row.unsqueeze(0) for ids in batches or [] for row in ids]
    check_same(windows)
    run = Run(model, recipe, report, windows, windows[: recipe.calib.score_samples], batches, device, progress,
              distill_windows, stream)
    before_blocks(run)
    release_free_memory()
    inputs = _compress_blocks(run, home)
    for step in recipe.steps:
        if has(step, "after", "lm_head"):
            quantize_head_(run, step, inputs)
    if run.targets is not None:
        del inputs
        release_free_memory()
        distill_after_(run)
    report.seconds = time.perf_counter() - t0
    return report


def _compress_blocks(run: Run, home: torch.device):
    """The block-level and Linear-level phases, block by block; returns the last block's outputs."""
    model, recipe, report, stream, device = run.model, run.recipe, run.report, run.stream, run.device
    dtype = next(model.parameters()).dtype
    act_dtype = dtype if recipe.calib.activation_dtype == "model" else getattr(torch, recipe.calib.activation_dtype)
    needs = recipe.needs
    shrink = [s for s in recipe.steps if has(s, "block", "shrink")]
    blocks = decoder_blocks(model)
    calib = recipe.calib  # MoE experts' statistics from all tokens: only when asked (None: the routed ones)
    asked = calib.all_experts or calib.min_expert_tokens
    coverage = Coverage(calib.all_experts, calib.min_expert_tokens) if asked else None
    inputs = None
    if needs or any(s.needs_data for s in shrink):
        if not run.batches:
            raise ValueError("this recipe needs calibration data, but no batches were given")
        inputs = capture_block_inputs(model, stack_batches(shard(run.windows), recipe.calib.batch_size), home)
        inputs.hidden = [h.to(device, act_dtype) for h in inputs.hidden]
        inputs.extras_to_(device)  # the model stays home; the blocks run on `device`, one at a time
    bar = tqdm(range(stream.first if stream else 0, len(blocks)), desc="compress", unit="block",
               disable=not run.progress, initial=stream.first if stream else 0, total=len(blocks))
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
            unit = "self_attn" if step.unit == "heads" else "mlp"
            n_remove = run.removal[id(step)][prefix] if id(step) in run.removal else None
            scores = run.oba[id(step)][0][prefix] if id(step) in run.oba else None
            metrics = (remove_experts_(model, prefix, step, inputs, run.fisher, recipe.calib.seed, (run.allocated,))
                       if step.unit == "experts" else
                       shrink_block_(model, prefix, step, inputs, run.fisher, n_remove, scores))
            if metrics:  # {}: a dense block of an MoE model, no experts to remove
                report.add(f"{prefix}.{unit}", step, metrics)
        plan = targeted(block_linears(model, i), recipe.steps, run.allocated)
        linears = {fqn: model.get_submodule(fqn) for fqn in plan}
        done: dict[str, Quantized | Factors] = {}
        compress = partial(_compress_linear, report, plan, linears, run.fisher, done, coverage,
                           _global_scales(plan, linears))
        routers = getattr(architecture(model).experts, "routers", ())  # scaled with AWQ's pairs, never searched
        for step in recipe.steps:
            if has(step, "block", "awq"):
                log.info("block %d awq alphas: %s", i,
                         awq_smooth_block_(block, prefix, awq_pairs(model), inputs, step, routers))
            if has(step, "block", "smoothquant"):
                log.info("block %d smoothquant max s: %s", i,
                         smoothquant_block_(block, prefix, awq_pairs(model), inputs, step, routers))
        if inputs is not None:
            inputs.hidden = compress_block(block, inputs, linears, needs, compress, low_memory=stream is not None,
                                           coverage=coverage)
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
    if any(s.unit != "experts" for s in shrink):
        update_config_(model)
    update_expert_config_(model, [s for s in shrink if s.unit == "experts"])
    return inputs


def _global_scales(plan: dict[str, list[Step]], linears: dict[str, nn.Module]) -> dict[str, Tensor]:
    """NVFP4's global scale of each Linear a quantize step puts on it, one per fused group (q/k/v,
    gate/up) from the weights as the block starts."""
    nvfp4 = [f for f, steps in plan.items()
             if any(isinstance(s, Quantize) and s.format in FORMATS and FORMATS[s.format].global_scale for s in steps)]
    return shared_global_scales({f: weight_matrix(linears[f]).detach() for f in nvfp4})


def _compress_linear(report: Report, plan: dict, linears: dict, fisher: dict, done: dict, coverage: Coverage | None,
                     global_scales: dict[str, Tensor], fqn: str, stats: LinearStats) -> None:
    """Apply the planned steps to one Linear, in recipe order, and record their metrics."""
    for step in plan[fqn]:
        t = time.perf_counter()
        if getattr(step, "needs", None) and not stats.n_tokens:  # never left in full precision unasked
            raise ValueError(f"{fqn} ({step.kind} {step.method}) received no calibration token (an MoE expert the "
                             "router chose for none): give more or other calibration text, set "
                             "calib.min_expert_tokens, or name it in the step's ignore to keep it uncompressed")
        try:
            metrics, result = apply_step(step, linears[fqn], stats, fisher.get(fqn), done.get(fqn),
                                         global_scales.get(fqn))
        except ValueError as e:
            raise ValueError(f"{fqn} ({step.kind} {step.method}): {e}") from None
        if "damp" in metrics:
            log.warning("%s: %s raised the damping from %g to %g (not positive definite with the first)",
                        fqn, step.method, step.damp, metrics["damp"])
        if result is not None:
            done[fqn] = result
        metrics.update(params=weight_matrix(linears[fqn]).numel(), seconds=time.perf_counter() - t)
        if stats.n_tokens:  # the tokens its statistics came from: an MoE expert's routed share
            metrics["tokens"] = stats.n_tokens
        expert = fqn.rpartition(".")[0]
        if coverage is not None and expert in coverage.widened:
            metrics.update(coverage="all tokens", routed_tokens=coverage.widened[expert])
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
