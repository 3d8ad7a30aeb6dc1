"""Budget allocation: spend one global budget (mean sparsity, average bits) across layers.

Every allocation here is planned on the dense model, before the streaming pass compresses block 0,
because the first block cannot wait for statistics of the last. Two kinds:

- curves: each layer gets a predicted loss for each option (a sparsity on a grid, a bit width) and
  `allocate` picks one option per layer to minimize the summed prediction within the budget, an
  exact multiple-choice knapsack (dynamic programming over the budget in fine bins);
- rules: OWL and DLP map one score per decoder block linearly onto sparsities around the mean.

The result is a per-layer copy of each step (`plan_steps`), which the streaming pass applies as it
would a uniform step.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import replace

import torch
from torch import Tensor, nn

from .calibrate import dense_pass, stack_batches
from .config import Prune, Quantize
from .distributed import shard
from .formats import stored_bytes
from .fpquant import FORMATS, fused_groups, rtn_float
from .grid import QuantSpec, rtn
from .model import block_linears, blocks_path, decoder_blocks, match, weight_matrix
from .scores import SCORERS, fisher_saliency, lamp, outlier_ratio, wanda_median
from .stats import FisherStats, LinearStats, collect_fisher
from .structured import Structured, channel_scores, half_up, keep_count

log = logging.getLogger(__name__)

SPARSITY_GRID = 0.01  # step between the sparsities a curve allocation may choose
MEASURE_LEVELS = 3  # sparsities at which "measured" prunes each block: mean − range, mean, mean + range
MEASURE_WINDOWS = 4  # calibration windows on which "measured" reads the loss


def allocate(cost: dict[str, Sequence[float]], size: dict[str, Sequence[float]], budget: float,
             *, bins: int | None = None) -> dict[str, int]:
    """One option per unit that minimizes Σ cost subject to Σ size ≤ budget.

    Multiple-choice knapsack by dynamic programming over the budget cut in `bins` equal parts
    (default 200 per unit, at least 20,000), each option's size rounded to the nearest bin. Of the
    end states, the cheapest whose choices fit the budget with their true sizes is taken, so the
    result always fits and is optimal up to that rounding. Raises ValueError when even the smallest
    options exceed the budget.
    """
    units = list(cost)
    if not units:
        return {}
    smallest = sum(min(size[u]) for u in units)
    if smallest > budget * (1 + 1e-9):
        raise ValueError(f"the budget {budget:.6g} is below the smallest possible total {smallest:.6g}")
    bins = bins or max(20_000, 200 * len(units))
    unit_size = budget / bins
    best = torch.full((bins + 1,), math.inf, dtype=torch.float64)
    best[0] = 0.0
    choices, weights = [], []
    for u in units:
        c = torch.as_tensor(cost[u], dtype=torch.float64)
        w = torch.as_tensor([max(0, round(s / unit_size)) for s in size[u]], dtype=torch.long)
        candidates = torch.full((len(c), bins + 1), math.inf, dtype=torch.float64)
        for k in range(len(c)):
            if w[k] <= bins:
                candidates[k, w[k]:] = best[: bins + 1 - w[k]] + c[k]
        best, pick = candidates.min(0)
        choices.append(pick)
        weights.append(w)
    for end in best.argsort().tolist():
        if not math.isfinite(best[end]):
            break
        out, at = {}, end
        for u, pick, w in zip(reversed(units), reversed(choices), reversed(weights)):
            out[u] = int(pick[at])
            at -= int(w[out[u]])
        if sum(size[u][k] for u, k in out.items()) <= budget * (1 + 1e-12):
            return out
    raise ValueError(f"the budget {budget:.6g} is too tight for these options at {bins} bins")


def spread(score: dict[str, float], mean: float, width: float) -> dict[str, float]:
    """OWL's rule: scores mapped linearly onto [0, 2·width], then centred so that the values average
    to `mean`; the highest score gets the lowest value (the most important layer is pruned least)."""
    values = torch.tensor(list(score.values()), dtype=torch.float64)
    span = values.max() - values.min()
    norm = (values - values.min()) / span * 2 * width if span > 0 else torch.zeros_like(values)
    return {k: float(mean - (v - norm.mean())) for k, v in zip(score, norm)}


def pruning_curve(saliency: Tensor, grid: Sequence[float]) -> list[float]:
    """Predicted loss of pruning a layer to each sparsity in `grid`: the sum of its lowest saliencies."""
    flat = saliency.flatten().double().sort().values
    total = torch.cat([flat.new_zeros(1), flat.cumsum(0)])
    return [float(total[round(s * flat.numel())]) for s in grid]


def sparsity_grid(mean: float, width: float) -> list[float]:
    lo, hi = max(0.0, mean - width), min(0.99, mean + width)
    steps = round((hi - lo) / SPARSITY_GRID)
    return [round(lo + i * (hi - lo) / steps, 6) for i in range(steps + 1)] if steps else [mean]


def plan_steps(model: nn.Module, steps: Sequence, batches: list[Tensor] | None, *, score_samples: int,
               progress: bool = True) -> dict[tuple[int, str], Prune | Quantize]:
    """(step index, fqn) -> the step with this layer's own sparsity or bit width, for every step
    whose allocation is not uniform; steps and layers left out keep the recipe's values."""
    planned = [(i, s) for i, s in enumerate(steps)
               if s.allocation != "uniform" and isinstance(s, Prune | Quantize)]  # structured plans its own
    if not planned:
        return {}
    linears = {fqn: m for b in range(len(decoder_blocks(model))) for fqn, m in block_linears(model, b).items()}
    kinds = {s.allocation for _, s in planned}
    # the scoring passes read the first score_samples calibration sequences, one at a time
    samples = [row.unsqueeze(0) for ids in batches or [] for row in ids][:score_samples]
    if kinds - {"lamp"} and not samples:
        raise ValueError(f"allocation {sorted(kinds - {'lamp'})[0]} needs calibration data")
    fisher = {}
    if "fisher" in kinds:
        targets = {f: m for f, m in linears.items() if any(match(f, s.targets, s.ignore) for _, s in planned)}
        fisher = collect_fisher(model, shard(samples), targets, progress=progress)
    stats: dict[str, LinearStats] = {}  # the inputs' Σx² of every Linear, from the dense model
    # every rank measures the loss on the same few probe windows (the result is the same everywhere)
    probe = [torch.cat(samples[:MEASURE_WINDOWS])] if "measured" in kinds else []
    if kinds & {"owl", "dlp", "measured"}:
        stats = dense_pass(model, stack_batches(shard(samples), 4), progress=progress).stats
    plan: dict[tuple[int, str], Prune | Quantize] = {}
    for index, step in planned:
        targets = {f: m for f, m in linears.items() if match(f, step.targets, step.ignore)}
        if isinstance(step, Prune):
            per_layer = _plan_sparsity(model, step, targets, fisher, stats, probe, progress)
            plan.update({(index, f): replace(step, sparsity=s) for f, s in per_layer.items()})
        elif step.budget.formats:  # bf16: the Linear is left out of the step
            per_layer = _plan_formats(model, step, targets, fisher)
            plan.update({(index, f): None if fmt == "bf16" else replace(step, format=fmt, budget=None)
                         for f, fmt in per_layer.items()})
        else:
            per_layer = _plan_bits(model, step, targets, fisher)
            plan.update({(index, f): replace(step, bits=b) for f, b in per_layer.items()})
    return plan


def _plan_sparsity(model: nn.Module, step: Prune, targets: dict[str, nn.Module], fisher: dict,
                   stats: dict[str, LinearStats], probe: list[Tensor], progress: bool) -> dict[str, float]:
    if step.allocation == "measured":
        return _measured_sparsity(model, step, targets, stats, probe, progress)
    if step.allocation in ("owl", "dlp"):
        blocks = _by_block(model, targets)
        W = {f: weight_matrix(m).detach().float() for f, m in targets.items()}
        score = {}
        for block, fqns in blocks.items():
            layers = [(W[f], stats[f].x_norm) for f in fqns]
            if step.allocation == "owl":
                score[block] = outlier_ratio(layers, step.owl_m)
            else:  # DLP: the median is the block's unimportance, its inverse the importance
                score[block] = 1 / max(wanda_median(layers), 1e-30)
        per_block = spread(score, step.sparsity, step.allocation_range)
        log.info("%s block scores %s -> sparsities %s", step.allocation, score, per_block)
        return {f: min(max(per_block[_block_of(model, f)], 0.0), 0.99) for f in targets}
    grid = sparsity_grid(step.sparsity, step.allocation_range)
    cost, size = {}, {}
    for fqn, m in targets.items():
        W = weight_matrix(m).detach().float()
        saliency = fisher_saliency(W, fisher[fqn].diagonal) if step.allocation == "fisher" else lamp(W)
        cost[fqn] = pruning_curve(saliency, grid)
        size[fqn] = [W.numel() * (1 - s) for s in grid]
    budget = sum(weight_matrix(m).numel() for m in targets.values()) * (1 - step.sparsity)
    pick = allocate(cost, size, budget)
    return {f: grid[k] for f, k in pick.items()}


def _plan_bits(model: nn.Module, step: Quantize, targets: dict[str, nn.Module], fisher: dict) -> dict[str, int]:
    """Bit width per Linear: least summed Fisher error ½ Σ F (W − Ŵ_rtn)² within avg_bits (code bits
    weighted by parameters) or target_bytes (the checkpoint's tensor bytes)."""
    choices = sorted(step.budget.choices)
    cost, size = {}, {}
    for fqn, m in targets.items():
        W = weight_matrix(m).detach().float()
        F = fisher[fqn].diagonal
        cost[fqn] = []
        for bits in choices:
            error = W - rtn(W, QuantSpec(bits, step.group_size, step.sym)).weight
            cost[fqn].append(float(0.5 * (F * error.square()).sum()))
        if step.budget.target_bytes is None:
            size[fqn] = [W.numel() * b for b in choices]
        else:
            size[fqn] = [stored_bytes(W.shape[1], W.shape[0], QuantSpec(b, step.group_size, step.sym))
                         for b in choices]
    if step.budget.target_bytes is None:
        budget = step.budget.avg_bits * sum(weight_matrix(m).numel() for m in targets.values())
    else:  # what stays unquantized counts too
        fixed = _fixed_bytes(model, targets)
        budget = step.budget.target_bytes - fixed
        least = sum(min(v) for v in size.values())
        if budget < least:
            raise ValueError(f"quantize.target_bytes {step.budget.target_bytes} is below the smallest this model "
                             f"can take with bits_choices {choices}: {fixed + least} bytes")
    pick = allocate(cost, size, budget)
    return {f: choices[k] for f, k in pick.items()}


def _plan_formats(model: nn.Module, step: Quantize, targets: dict[str, nn.Module], fisher: dict) -> dict[str, str]:
    """Format per Linear ("bf16": unquantized): least summed Fisher error ½ Σ F (W − Ŵ_rtn)² within
    avg_bits (stored bits with scales, weighted by parameters) or target_bytes (checkpoint bytes).
    Linears that vLLM fuses (q/k/v, gate/up) get one format: vLLM runs them as one GEMM."""
    choices = list(step.budget.formats)
    cost, size = {}, {}
    for fqn, m in targets.items():
        W = weight_matrix(m).detach().float()
        F = fisher[fqn].diagonal
        out, cols = W.shape
        rounded = {f: W.bfloat16().float() if f == "bf16" else rtn_float(W, FORMATS[f]).weight for f in choices}
        cost[fqn] = [float(0.5 * (F * (W - rounded[f]).square()).sum()) for f in choices]
        bits = [16.0 if f == "bf16" else FORMATS[f].avg_bits(out, cols) for f in choices]
        size[fqn] = [W.numel() * b / (8 if step.budget.target_bytes is not None else 1) for b in bits]
    if step.budget.target_bytes is None:
        budget = step.budget.avg_bits * sum(weight_matrix(m).numel() for m in targets.values())
    else:
        budget = step.budget.target_bytes - _fixed_bytes(model, targets)
    least = sum(min(v) for v in size.values())
    if budget < least:
        raise ValueError(f"quantize's budget is below the smallest the format_choices {choices} allow")
    groups = {g[0]: g for g in fused_groups(cost)}
    summed = lambda per: {k: [sum(v) for v in zip(*(per[f] for f in g))] for k, g in groups.items()}  # noqa: E731
    pick = allocate(summed(cost), summed(size), budget)
    return {f: choices[pick[k]] for k, g in groups.items() for f in g}


def _fixed_bytes(model: nn.Module, targets: dict[str, nn.Module]) -> int:
    """Bytes of the checkpoint's tensors other than the targets' weights (what stays as it is)."""
    tensors = {t.data_ptr(): t for t in model.state_dict().values()}
    for m in targets.values():
        tensors.pop(m.weight.data_ptr(), None)
    return sum(t.numel() * t.element_size() for t in tensors.values())


@torch.no_grad()
def _measured_sparsity(model: nn.Module, step: Prune, targets: dict[str, nn.Module], stats: dict[str, LinearStats],
                       probe: list[Tensor], progress: bool) -> dict[str, float]:
    """Per decoder block, the measured loss increase of pruning that block alone (Wanda's score, or
    magnitude for magnitude steps, without weight update) at MEASURE_LEVELS sparsities on the probe
    windows, interpolated onto the sparsity grid; then the knapsack over blocks."""
    from tqdm.auto import tqdm

    from .evaluate import heldout_loss
    from .model import set_weight_matrix_
    from .prune import select_mask

    scorer = "magnitude" if step.method == "magnitude" else "wanda"
    blocks = _by_block(model, targets)
    grid = sparsity_grid(step.sparsity, step.allocation_range)
    at = [round(i * (len(grid) - 1) / (MEASURE_LEVELS - 1)) for i in range(MEASURE_LEVELS)]
    base = heldout_loss(model, probe)
    cost, size = {}, {}
    for block, fqns in tqdm(blocks.items(), desc="measure", unit="block", disable=not progress):
        saved = {f: weight_matrix(targets[f]).detach().clone() for f in fqns}
        measured = []
        for i in at:
            for f in fqns:
                W = saved[f].float()
                score = SCORERS[scorer](W, stats[f] if scorer == "wanda" else None)  # magnitude reads none
                set_weight_matrix_(targets[f], W * select_mask(score, grid[i]))
            measured.append(heldout_loss(model, probe) - base)
        for f in fqns:
            set_weight_matrix_(targets[f], saved[f])
        cost[block] = [_interpolate(grid[k], [grid[i] for i in at], measured) for k in range(len(grid))]
        size[block] = [sum(saved[f].numel() for f in fqns) * (1 - s) for s in grid]
    budget = sum(weight_matrix(m).numel() for m in targets.values()) * (1 - step.sparsity)
    pick = allocate(cost, size, budget)
    log.info("measured block curves %s -> sparsities %s", cost, {b: grid[k] for b, k in pick.items()})
    return {f: grid[pick[_block_of(model, f)]] for f in targets}


def _interpolate(x: float, xs: list[float], ys: list[float]) -> float:
    for x0, x1, y0, y1 in zip(xs, xs[1:], ys, ys[1:]):
        if x <= x1 or x1 == xs[-1]:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0) if x1 > x0 else y0
    return ys[-1]


def _by_block(model: nn.Module, fqns) -> dict[str, list[str]]:
    """Decoder block name -> the fqns inside it, in order."""
    blocks: dict[str, list[str]] = {}
    for fqn in fqns:
        blocks.setdefault(_block_of(model, fqn), []).append(fqn)
    return blocks


def _block_of(model: nn.Module, fqn: str) -> str:
    prefix = blocks_path(model) + "."
    return prefix + fqn[len(prefix):].split(".", 1)[0]


def plan_removal(model: nn.Module, step: Structured, fisher: dict[str, FisherStats]) -> dict[str, int]:
    """Block prefix -> MLP channels to remove, for allocation "fisher": as many in all as the uniform
    removal, each block within fraction ± allocation_range, with the least summed Fisher saliency
    ½ΣFw² of the removed channels (each block removes its lowest-scoring ones)."""
    by_fisher = replace(step, score="fisher")
    options, cost, kept, budget = {}, {}, {}, 0
    for b in range(len(decoder_blocks(model))):
        prefix = f"{blocks_path(model)}.{b}"
        ranked = channel_scores(model, prefix, by_fisher, None, fisher).double().sort().values
        n = len(ranked)
        uniform = n - keep_count(n, step.fraction, step.multiple)
        lo = max(0, half_up((step.fraction - step.allocation_range) * n))
        hi = min(n - step.multiple, half_up((step.fraction + step.allocation_range) * n))
        options[prefix] = sorted({r for r in range(lo, hi + 1) if (n - r) % step.multiple == 0} | {uniform})
        removed_cost = torch.cat([ranked.new_zeros(1), ranked.cumsum(0)])
        cost[prefix] = [float(removed_cost[r]) for r in options[prefix]]
        kept[prefix] = [n - r for r in options[prefix]]  # their total may not exceed the uniform removal's
        budget += n - uniform
    pick = allocate(cost, kept, budget)
    return {prefix: options[prefix][i] for prefix, i in pick.items()}
