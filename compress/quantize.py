"""Quantizing a Linear as a recipe step says (quantize_linear: RTN, GPTQ, AWQ, and the add-ons of
densesparse.py and guided.py), and AWQ's scale search and smoothing. The grid is grid.py's, GPTQ
gptq.py's.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .densesparse import dense_and_sparse, sparse_count
from .gptq import gptq
from .grid import Quantized, QuantSpec, rtn
from .guided import solve
from .model import match, set_weight_matrix_, weight_matrix
from .prune import relative_error
from .recipe import Quantize
from .stats import FisherStats, LinearStats, all_reduce_stats_


def awq_scales(W: Tensor, xtx: Tensor, x_mag: Tensor, spec: QuantSpec, grid: int = 20) -> tuple[Tensor, float]:
    """AWQ's activation-aware scale search (Lin et al. 2024, §3.2) for the Linears that share one
    input: W [out, in] is their weights stacked, xtx [in, in] = Σ x xᵀ, x_mag [in] the mean input
    magnitude per channel.

    For α on a grid in [0, 1), s = x_mag^α (normalized), the weights W·diag(s) are rounded and the
    output error ‖(W − Q(W·s)/s) X‖² is read off XᵀX exactly (no forward passes needed). Returns
    the best s [in] and its α.
    """
    best, best_err, best_alpha = torch.ones_like(x_mag), float("inf"), 0.0
    mag = x_mag.clamp(min=1e-8)
    for i in range(grid):
        alpha = i / grid
        s = mag.pow(alpha)
        s = s / (s.max() * s.min()).sqrt()
        D = W - rtn(W * s, spec).weight / s
        err = ((D @ xtx) * D).sum().item()
        if err < best_err:
            best, best_err, best_alpha = s, err, alpha
    return best, best_alpha


def quantize_linear(linear: nn.Module, step: Quantize, stats: LinearStats, fisher: FisherStats | None = None
                    ) -> tuple[dict, Quantized]:
    """Quantize `linear` as `step` says. Its weight becomes the dequantized Ŵ at once (so later
    calibration forwards see it); the codes come back for packing into a QuantLinear (or, for
    OWQ and LeanQuant, the modules of layers.quant_module).

    Zeros already in the weight (an earlier prune step) are kept exactly. `fisher` carries the
    gradient-weighted Hessians of a GuidedQuant step (hessian: guided).
    """
    W = weight_matrix(linear).detach().float().clone()  # [out, in]
    spec = QuantSpec(step.bits, step.group_size, step.sym)
    if step.group_size != -1 and step.group_size > W.shape[1]:
        # only low-rank factors and structurally narrowed Linears get here (apply.check_shapes refuses
        # the recipe's own targets up front): one group covers the row
        spec = QuantSpec(step.bits, -1, step.sym)
    zeros = W == 0
    keep = ~zeros if zeros.any() else None
    if step.sparse_fraction > 0:
        H = stats.hessian if stats.xtx_upper is not None and stats.n_tokens > 0 else None
        if H is None and (step.method == "gptq" or step.sparse_score == "sensitivity"):
            raise ValueError(f"{step.method} with sparse_score {step.sparse_score} needs calibration inputs, "
                             "but this Linear received none")
        qw = dense_and_sparse(W, spec, sparse_count(W.numel(), step.sparse_fraction), score=step.sparse_score, H=H,
                              method=step.method, keep=keep, act_order=step.act_order,
                              static_groups=step.static_groups, block_size=step.block_size, damp=step.damp)
    elif step.method == "leanquant" or step.outlier_fraction > 0 or step.hessian == "guided":
        if stats.xtx_upper is None or stats.n_tokens == 0:
            raise ValueError(f"{step.method} needs calibration inputs, but this Linear received none")
        if step.hessian == "guided" and (fisher is None or fisher.guided_sum is None):
            raise ValueError("hessian guided needs the gradient-weighted Hessians of this Linear (collected "
                             "before the streaming pass), but none were given")
        qw = solve(W, stats.hessian, spec, step, keep, fisher.guided if step.hessian == "guided" else None)
    elif step.method == "gptq":
        if stats.xtx_upper is None or stats.n_tokens == 0:
            raise ValueError("gptq needs calibration inputs, but this Linear received none")
        qw = gptq(W, stats.hessian, spec, keep=keep, act_order=step.act_order,
                  static_groups=step.static_groups, block_size=step.block_size, damp=step.damp)
    else:  # rtn, and awq whose scales were folded in before this block ran (awq_smooth_block_)
        qw = rtn(W, spec)
    W_new = qw.weight
    set_weight_matrix_(linear, W_new)
    metrics = {"bits": spec.bits, "group_size": spec.group_size, "error": relative_error(W, W_new, stats),
               "avg_bits": qw.avg_bits}
    if step.sparse_fraction > 0:
        metrics["detached"] = qw.sparse_idx.numel()
    if keep is not None:
        metrics["sparsity"] = (W_new == 0).float().mean().item()
    if qw.damp is not None and qw.damp > step.damp:
        metrics["damp"] = qw.damp
    return metrics, qw


@torch.no_grad()
def awq_smooth_block_(block: nn.Module, prefix: str, pairs, inputs, step: Quantize) -> dict[str, float]:
    """AWQ's smoothing for one decoder block, in place: for each (previous op, Linears) pair of the
    architecture table, search the per-channel scale s on the block's calibration inputs, divide
    the previous op's output channels by s and multiply the Linears' input columns by s (the
    block computes the same function). Returns the chosen α per pair.

    Pairs whose previous op's width differs from the Linears' input width (v_proj → o_proj under
    grouped-query attention) are skipped, as in AutoAWQ.
    """
    from .calibrate import observe, run_block_

    spec = QuantSpec(step.bits, step.group_size, step.sym)
    found = []
    for prev_name, names in pairs:
        linears = {n: block.get_submodule(n) for n in names if _has(block, n)}
        if not _has(block, prev_name) or not linears:
            continue
        if not all(match(f"{prefix}.{n}", step.targets, step.ignore) for n in linears):
            continue
        prev = block.get_submodule(prev_name)
        width = weight_matrix(prev).shape[0] if prev.weight.dim() == 2 else prev.weight.shape[0]
        if any(weight_matrix(m).shape[1] != width for m in linears.values()):
            continue
        found.append((prev, linears))
    if not found:
        return {}
    watched = {f"{i}.{n}": m for i, (_, ls) in enumerate(found) for n, m in ls.items()}
    with observe(watched, {"xtx"}) as stats:
        run_block_(block, inputs)
    all_reduce_stats_(stats.values())  # the search reads the error off XᵀX alone: summing it suffices
    alphas = {}
    for i, (prev, linears) in enumerate(found):
        st = stats[f"{i}.{next(iter(linears))}"]
        W = torch.cat([weight_matrix(m).float() for m in linears.values()])
        xtx = st.xtx / max(st.n_tokens, 1)
        x_rms = xtx.diagonal().clamp(min=0).sqrt()  # per-channel input magnitude
        s, alphas[",".join(linears)] = awq_scales(W, xtx, x_rms, spec, step.awq_grid)
        _scale_outputs_(prev, 1.0 / s)
        for m in linears.values():
            set_weight_matrix_(m, weight_matrix(m).float() * s)
    return alphas


def _has(block: nn.Module, name: str) -> bool:
    try:
        block.get_submodule(name)
        return True
    except AttributeError:
        return False


def _scale_outputs_(module: nn.Module, factor: Tensor) -> None:
    """Multiply the output channels of a norm or Linear by factor [channels]."""
    if module.weight.dim() == 2:
        set_weight_matrix_(module, weight_matrix(module).float() * factor[:, None])
    else:
        module.weight.mul_(factor.to(module.weight.dtype))
    if getattr(module, "bias", None) is not None:
        module.bias.mul_(factor.to(module.bias.dtype))
