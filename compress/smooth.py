"""Per-channel scales migrated into the op before a block's Linears: AWQ and SmoothQuant.

Both take, for each (previous op, the Linears that read its output) pair of the architecture
table's `awq_pairs`, a scale s per input channel, divide the previous op's output channels by s
(a norm's weight or a Linear's rows) and multiply the Linears' input columns by s, so the block
computes the same function and only the ranges the quantizer sees move. They differ in s:

- AWQ (Lin et al. 2024, §3.2) searches s = x_mag^α over α on a grid for the least output error of
  the rounded weights, read off XᵀX of the block's calibration inputs;
- SmoothQuant (Xiao et al. 2023, Eq. 4) sets s = max|X_j|^α / max|W_j|^(1−α) from calibration
  maxima, α the recipe's smooth_alpha, to flatten the activations for their quantization.

Pairs whose previous op's width differs from the Linears' input width (v_proj → o_proj under
grouped-query attention) are skipped, as in AutoAWQ.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .config import Quantize
from .grid import QuantSpec, rtn
from .model import match, set_weight_matrix_, weight_matrix
from .stats import LinearStats, all_reduce_stats_


def awq_scales(W: Tensor, xtx: Tensor, x_mag: Tensor, spec: QuantSpec, grid: int = 20) -> tuple[Tensor, float]:
    """AWQ's activation-aware scale search for the Linears that share one input: W [out, in] is
    their weights stacked, xtx [in, in] = Σ x xᵀ, x_mag [in] the mean input magnitude per channel.

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


def smoothquant_scales(x_absmax: Tensor, W: Tensor, alpha: float) -> Tensor:
    """SmoothQuant's s [in] = max|X_j|^α / max_i |W_ij|^(1−α) for the Linears W [out, in] stacked."""
    w_absmax = W.abs().amax(0).float().clamp(min=1e-5)
    return (x_absmax.float().clamp(min=1e-5).pow(alpha) / w_absmax.pow(1 - alpha)).clamp(min=1e-5)


@torch.no_grad()
def awq_smooth_block_(block: nn.Module, prefix: str, pairs, inputs, step: Quantize) -> dict[str, float]:
    """AWQ's smoothing for one decoder block, in place. Returns the chosen α per pair."""
    spec = QuantSpec(step.bits, step.group_size, step.sym)
    alphas = {}
    # the search reads the error off XᵀX alone: summing it over ranks suffices
    for prev, linears, st in _observed_pairs(block, prefix, pairs, inputs, step, "xtx"):
        W = torch.cat([weight_matrix(m).float() for m in linears.values()])
        xtx = st.xtx / max(st.n_tokens, 1)
        x_rms = xtx.diagonal().clamp(min=0).sqrt()  # per-channel input magnitude
        s, alphas[",".join(linears)] = awq_scales(W, xtx, x_rms, spec, step.awq_grid)
        _migrate_(prev, linears, s)
    return alphas


@torch.no_grad()
def smoothquant_block_(block: nn.Module, prefix: str, pairs, inputs, step: Quantize) -> dict[str, float]:
    """SmoothQuant's migration for one decoder block, in place. Returns the largest s of each pair."""
    largest = {}
    for prev, linears, st in _observed_pairs(block, prefix, pairs, inputs, step, "x_absmax"):
        W = torch.cat([weight_matrix(m).float() for m in linears.values()])
        s = smoothquant_scales(st.x_absmax.to(W.device), W, step.act.alpha)
        _migrate_(prev, linears, s)
        largest[",".join(linears)] = float(s.max())
    return largest


def _observed_pairs(block: nn.Module, prefix: str, pairs, inputs, step: Quantize, need: str
                    ) -> list[tuple[nn.Module, dict[str, nn.Module], LinearStats]]:
    """(previous op, its Linears, their input statistics `need` over the block's calibration inputs,
    all-reduced under torchrun) for every pair that applies to this block and step."""
    from .calibrate import observe, run_block_

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
        return []
    watched = {f"{i}.{n}": m for i, (_, ls) in enumerate(found) for n, m in ls.items()}
    with observe(watched, {need}) as stats:
        run_block_(block, inputs)
    all_reduce_stats_(stats.values())
    return [(prev, linears, stats[f"{i}.{next(iter(linears))}"]) for i, (prev, linears) in enumerate(found)]


def _migrate_(prev: nn.Module, linears: dict[str, nn.Module], s: Tensor) -> None:
    """Divide prev's output channels by s and multiply the Linears' input columns by s."""
    _scale_outputs_(prev, 1.0 / s)
    for m in linears.values():
        set_weight_matrix_(m, weight_matrix(m).float() * s)


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
