"""The quantization grid: its parameters (QuantSpec), choosing them per group, rounding onto the grid
(RTN) and back. A leaf module: every quantizer (GPTQ, AWQ, OWQ, dense-and-sparse) and the kernels'
references build on it.

One convention everywhere:

    q = clamp(round(w / scale) + zero, 0, 2^bits − 1)        ŵ = (q − zero) · scale

with integer zero points, so 0.0 is exact and pruned weights stay zero. Groups of `group_size`
consecutive inputs share a scale and zero; scale and zero are [out, ceil(in / group_size)], and
when in % group_size != 0 the last group is shorter (ragged). group_size -1 means one group per
row. Symmetric grids fix zero at 2^(bits−1), so the codes are compressed-tensors' signed values
shifted by that offset. Scales are rounded to float16, the dtype they are stored in, before any
code is chosen, so the stored model is exactly the one that was optimized.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .pack import dequantize, expand_groups


@dataclass(frozen=True)
class QuantSpec:
    bits: int = 4
    group_size: int = 128  # -1: one group per output row
    sym: bool = True

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    def group(self, cols: int) -> int:
        """The group length for a matrix with `cols` inputs."""
        return cols if self.group_size == -1 else self.group_size


def choose_qparams(W: Tensor, spec: QuantSpec) -> tuple[Tensor, Tensor]:
    """Min-max scale and zero for each group of W [out, in] -> (scale, zero), each [out, n_groups] fp32.

    The grid always contains 0 (min ≤ 0 ≤ max), as GPTQ's and llm-compressor's observers do.
    """
    out, cols = W.shape
    g = spec.group(cols)
    pad = -cols % g
    Wg = W.float()
    if pad:  # ragged last group: pad with zeros, which the grid contains anyway
        Wg = torch.nn.functional.pad(Wg, (0, pad))
    Wg = Wg.reshape(out, -1, g)
    lo, hi = Wg.amin(-1).clamp(max=0), Wg.amax(-1).clamp(min=0)
    if spec.sym:
        scale = torch.maximum(-lo, hi) / (spec.maxq / 2)  # [-max, max] over 2^bits − 1 steps
        zero = torch.full_like(scale, 2 ** (spec.bits - 1))
    else:
        scale = (hi - lo) / spec.maxq
    scale = _storable(scale)
    if not spec.sym:
        zero = torch.round(-lo / scale).clamp(0, spec.maxq)
    return scale, zero


def _storable(scale: Tensor) -> Tensor:
    """Round up to float16 (the stored dtype), so the grid still spans the group's range; empty
    groups get scale 1."""
    scale = torch.where(scale > 0, scale, torch.ones_like(scale)).clamp(2**-24, 65504.0)
    s16 = scale.half()
    s16 = torch.where(s16.float() < scale, torch.nextafter(s16, torch.full_like(s16, float("inf"))), s16)
    return s16.float()


def quantize(W: Tensor, scale: Tensor, zero: Tensor, spec: QuantSpec) -> Tensor:
    """Codes uint8 [out, in] of W on the grid (scale, zero) [out, n_groups]."""
    cols = W.shape[1]
    g = spec.group(cols)
    s, z = expand_groups(scale, g, cols), expand_groups(zero, g, cols)
    return (torch.round(W.float() / s) + z).clamp_(0, spec.maxq).to(torch.uint8)


@dataclass
class Quantized:
    """The result of quantizing one weight matrix."""

    codes: Tensor  # uint8 [out, in]
    scale: Tensor  # fp32 [out, n_groups], float16-representable
    zero: Tensor  # fp32 [out, n_groups], integers
    spec: QuantSpec
    damp: float | None = None  # GPTQ: the Hessian damping used (more than asked where H needed it)

    @property
    def weight(self) -> Tensor:
        return dequantize(self.codes, self.scale, self.zero, self.spec.group_size)

    @property
    def avg_bits(self) -> float:
        """Stored bits per weight: the codes, a float16 scale per group and, when asymmetric, a
        zero point of `bits` bits per group (compressed-tensors packs them)."""
        groups, cols = self.scale.shape[1], self.codes.shape[1]
        return self.spec.bits + groups * (16 + (0 if self.spec.sym else self.spec.bits)) / cols


def rtn(W: Tensor, spec: QuantSpec) -> Quantized:
    """Round to nearest on the min-max grid of each group."""
    scale, zero = choose_qparams(W, spec)
    return Quantized(quantize(W, scale, zero, spec), scale, zero, spec)
