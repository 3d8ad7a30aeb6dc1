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

Mixture-of-experts blocks: a name with `*` is a glob over the block's modules. In a reader it
takes every match (the norm before an MoE block feeds every expert's gate and up projections:
one scale vector for all of them, searched on the sum of each expert's output error over its own
routed tokens); in the previous op it makes one pair per match, the readers' `*` bound to the same
text (each expert's up_proj -> its own down_proj). The routers read the norm's output too: they
are not quantized and take no part in the search, but their input columns are scaled with the
others, so the routing is unchanged. An expert no calibration token reached adds no error.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Collection, Sequence

import torch
from torch import Tensor, nn

from .config import Quantize
from .grid import QuantSpec, rtn
from .model import match, set_weight_matrix_, weight_matrix
from .moe import calibrating
from .stats import LinearStats, all_reduce_stats_


def awq_scales(W: Sequence[Tensor], xtx: Sequence[Tensor], x_mag: Tensor, spec: QuantSpec, grid: int = 20
               ) -> tuple[Tensor, float]:
    """AWQ's activation-aware scale search for Linears that read one op's output. W[g] [out, in] are
    the weights of the Linears that see the same tokens, stacked, and xtx[g] [in, in] = Σ x xᵀ over
    those tokens (one group for a dense block; one per expert under an MoE norm); x_mag [in] is
    the mean input magnitude per channel.

    For α on a grid in [0, 1), s = x_mag^α (normalized), the weights W·diag(s) are rounded and the
    output error Σ_g ‖(W_g − Q(W_g·s)/s) X_g‖² is read off XᵀX exactly (no forward passes needed).
    Returns the best s [in] and its α.
    """
    best, best_err, best_alpha = torch.ones_like(x_mag), float("inf"), 0.0
    mag = x_mag.clamp(min=1e-8)
    for i in range(grid):
        alpha = i / grid
        s = mag.pow(alpha)
        s = s / (s.max() * s.min()).sqrt()
        err = 0.0
        for w, h in zip(W, xtx):
            D = w - rtn(w * s, spec).weight / s
            err += ((D @ h) * D).sum().item()
        if err < best_err:
            best, best_err, best_alpha = s, err, alpha
    return best, best_alpha


def smoothquant_scales(x_absmax: Tensor, W: Tensor, alpha: float) -> Tensor:
    """SmoothQuant's s [in] = max|X_j|^α / max_i |W_ij|^(1−α) for the Linears W [out, in] stacked."""
    w_absmax = W.abs().amax(0).float().clamp(min=1e-5)
    return (x_absmax.float().clamp(min=1e-5).pow(alpha) / w_absmax.pow(1 - alpha)).clamp(min=1e-5)


@torch.no_grad()
def awq_smooth_block_(block: nn.Module, prefix: str, pairs, inputs, step: Quantize,
                      routers: Collection[str] = ()) -> dict[str, float]:
    """AWQ's smoothing for one decoder block, in place. Returns the chosen α per pair.
    `routers`: block-relative names of MoE routers, scaled with a pair but never searched on."""
    spec = QuantSpec(step.bits, step.group_size, step.sym)
    alphas = {}
    # the search reads the error off XᵀX alone: summing it over ranks suffices
    for prev, linears, compensate, groups in _observed_pairs(block, prefix, pairs, inputs, step, "xtx", routers):
        tokens = sum(st.n_tokens for _, st in groups)
        xtx = [st.xtx / max(tokens, 1) for _, st in groups]
        W = [torch.cat([weight_matrix(linears[n]).float() for n in names]) for names, _ in groups]
        x_rms = sum(xtx[1:], xtx[0]).diagonal().clamp(min=0).sqrt()  # per-channel input magnitude
        s, alphas[",".join(linears)] = awq_scales(W, xtx, x_rms, spec, step.awq_grid)
        _migrate_(prev, {**linears, **compensate}, s)
    return alphas


@torch.no_grad()
def smoothquant_block_(block: nn.Module, prefix: str, pairs, inputs, step: Quantize,
                       routers: Collection[str] = ()) -> dict[str, float]:
    """SmoothQuant's migration for one decoder block, in place. Returns the largest s of each pair."""
    largest = {}
    for prev, linears, compensate, groups in _observed_pairs(block, prefix, pairs, inputs, step, "x_absmax", routers):
        W = torch.cat([weight_matrix(m).float() for m in linears.values()])
        x_absmax = torch.stack([st.x_absmax for _, st in groups]).amax(0)
        s = smoothquant_scales(x_absmax.to(W.device), W, step.act.alpha)
        _migrate_(prev, {**linears, **compensate}, s)
        largest[",".join(linears)] = float(s.max())
    return largest


def expand_pairs(block: nn.Module, pairs) -> list[tuple[str, tuple[str, ...]]]:
    """The pairs with their globs matched against the block's module names (module docstring)."""
    names = [n for n, _ in block.named_modules() if n]
    every = lambda pattern: fnmatch.filter(names, pattern) if "*" in pattern else [pattern]  # noqa: E731
    found = []
    for prev_name, readers in pairs:
        if "*" not in prev_name:
            found.append((prev_name, tuple(n for r in readers for n in every(r))))
            continue
        head, tail = prev_name.split("*", 1)
        for name in fnmatch.filter(names, prev_name):
            star = name[len(head): len(name) - len(tail)]
            found.append((name, tuple(n for r in readers for n in every(r.replace("*", star)))))
    return found


def _observed_pairs(block: nn.Module, prefix: str, pairs, inputs, step: Quantize, need: str,
                    routers: Collection[str] = ()):
    """(previous op, its Linears, the routers among its readers, [(Linears that saw the same tokens,
    their input statistics `need` over the block's calibration inputs, all-reduced under
    torchrun)]) for every pair that applies to this block and step and whose Linears saw a token
    (on every rank)."""
    from .calibrate import observe, run_block_

    found = []
    for prev_name, names in expand_pairs(block, pairs):
        linears = {n: block.get_submodule(n) for n in names if _has(block, n) and n not in routers}
        compensate = {n: block.get_submodule(n) for n in names if _has(block, n) and n in routers}
        if not _has(block, prev_name) or not linears:
            continue
        if not all(match(f"{prefix}.{n}", step.targets, step.ignore) for n in linears):
            continue
        prev = block.get_submodule(prev_name)
        width = weight_matrix(prev).shape[0] if prev.weight.dim() == 2 else prev.weight.shape[0]
        if any(weight_matrix(m).shape[1] != width for m in (*linears.values(), *compensate.values())):
            continue
        found.append((prev, linears, compensate))
    if not found:
        return []
    watched = {f"{i}.{n}": m for i, (_, ls, _) in enumerate(found) for n, m in ls.items()}
    with observe(watched, {need}) as stats, calibrating(block):  # every expert runs, on no tokens if none came
        run_block_(block, inputs)
    all_reduce_stats_(stats.values())
    result = []
    for i, (prev, linears, compensate) in enumerate(found):
        groups: dict[int, tuple[list[str], LinearStats]] = {}  # Linears sharing one input share its stats object
        for n in linears:
            st = stats.get(f"{i}.{n}")
            if st is not None and st.n_tokens:  # an expert that no token reached adds no error
                groups.setdefault(id(st), ([], st))[0].append(n)
        if groups:
            result.append((prev, linears, compensate, list(groups.values())))
    return result


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
