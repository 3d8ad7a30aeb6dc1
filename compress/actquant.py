"""Simulated activation quantization (W·A·), with runtime or offline smoothing.

Activations are rounded per token, symmetric, on the weights' grid convention (grid.py: codes
0 … 2^b − 1 around the zero point 2^(b−1), the scale rounded up to float16), and dequantized at
once: fake quant, so the perplexity harness measures what integer activations would do, with no
integer kernel behind it.

Runtime Smooth (Yi et al., "Rotated Runtime Smooth", ICLR 2025, §3.2): channel-wise outliers are
divided out of the activations by their per-channel maxima s, taken at runtime over the tokens of
the call, before the per-token rounding; the product is then Q(X/s)·diag(s)·Ŵᵀ, i.e. the scales
multiply the weight's input columns (a kernel applies them to the partial sums of channel groups;
here they are applied to the dequantized activations, which gives the same product). Combined
with a rotation of the residual stream (rotate.py), this is their RRS.

SmoothQuant (Xiao et al. 2023, Eq. 4): s = max|X_j|^α / max|W_j|^(1−α) from calibration maxima is
migrated offline into the op before the Linears (norm weight or the previous Linear's rows) and
into the Linears' input columns, so the model's function is unchanged and only the ranges move.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import Quantize
from .grid import QuantSpec, rtn
from .model import match, set_weight_matrix_, weight_matrix
from .quantize import _has, _scale_outputs_


def fake_quant_tokens(X: Tensor, bits: int) -> Tensor:
    """Round each row (token) of X [tokens, in] on its own symmetric bits-bit grid and dequantize."""
    return rtn(X, QuantSpec(bits, -1, True)).weight


def runtime_scales(X: Tensor, tokens: int | None = None) -> Tensor:
    """Per-channel maxima |X| [tokens, in] over each group of `tokens` consecutive rows (all rows when
    None), one row per token of X, clamped away from 0 so dead channels stay 0."""
    n, c = X.shape
    g = n if tokens is None else min(tokens, n)
    pad = -n % g
    A = F.pad(X.abs(), (0, 0, 0, pad)).reshape(-1, g, c).amax(1)  # [groups, in]
    return A.clamp(min=1e-5).repeat_interleave(g, dim=0)[:n]


def fake_quant_input(x: Tensor, bits: int, smooth: str = "none", tokens: int | None = None) -> Tensor:
    """x [..., in] as a Linear with `bits`-bit per-token activations sees it (dequantized, x's dtype).

    With smooth "runtime", x is divided by its runtime channel maxima before the rounding and
    multiplied back after it (the scales belong to the weight's columns: Q(x/s)·s·Ŵᵀ = Q(x/s)·(Ŵ·s)ᵀ).
    """
    X = x.reshape(-1, x.shape[-1]).float()
    if smooth == "runtime":
        s = runtime_scales(X, tokens)
        X = fake_quant_tokens(X / s, bits) * s
    else:
        X = fake_quant_tokens(X, bits)
    return X.to(x.dtype).reshape(x.shape)


def with_act_quant(m: nn.Module, steps: list) -> nn.Module:
    """m as an ActQuantLinear (layers.py) when the quantize step among `steps` asks for act_bits, else m.
    SmoothQuant's scales are already in the weights, so its Linears round at runtime unsmoothed."""
    q = next((s for s in steps if isinstance(s, Quantize)), None)
    if q is None or q.act is None or getattr(m, "kind", None) != "quant":  # a QuantLinear: not OWQ's, not LeanQuant
        return m
    smooth = "runtime" if q.act.smooth == "runtime" else "none"
    return m.act_quantized(q.act.bits, smooth, q.act.tokens)


def smoothquant_scales(x_absmax: Tensor, W: Tensor, alpha: float) -> Tensor:
    """SmoothQuant's s [in] = max|X_j|^α / max_i |W_ij|^(1−α) for the Linears W [out, in] stacked."""
    w_absmax = W.abs().amax(0).float().clamp(min=1e-5)
    return (x_absmax.float().clamp(min=1e-5).pow(alpha) / w_absmax.pow(1 - alpha)).clamp(min=1e-5)


@torch.no_grad()
def smoothquant_block_(block: nn.Module, prefix: str, pairs, inputs, step: Quantize) -> dict[str, float]:
    """SmoothQuant's migration for one decoder block, in place, from the maxima of the block's
    calibration inputs: for each (previous op, Linears) pair of the architecture table (AWQ's
    pairs) the previous op's output channels are divided by s and the Linears' input columns
    multiplied by s. Pairs whose widths differ (v_proj → o_proj under grouped-query attention) are
    skipped. Returns the largest s of each pair."""
    from .calibrate import observe, run_block_
    from .stats import all_reduce_stats_

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
    with observe(watched, {"x_absmax"}) as stats:
        run_block_(block, inputs)
    all_reduce_stats_(stats.values())  # under torchrun: the maxima over every rank's windows
    largest = {}
    for i, (prev, linears) in enumerate(found):
        W = torch.cat([weight_matrix(m).float() for m in linears.values()])
        s = smoothquant_scales(stats[f"{i}.{next(iter(linears))}"].x_absmax.to(W.device), W, step.act.alpha)
        _scale_outputs_(prev, 1.0 / s)
        for m in linears.values():
            set_weight_matrix_(m, weight_matrix(m).float() * s)
        largest[",".join(linears)] = float(s.max())
    return largest
