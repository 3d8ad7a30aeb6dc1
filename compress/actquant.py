"""Simulated activation quantization (W·A·), with runtime smoothing.

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

SmoothQuant's offline alternative (scales migrated into the op before the Linears from
calibration maxima) is smooth.py's.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .config import Quantize
from .grid import QuantSpec, rtn


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
