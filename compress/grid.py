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

A group's grid spans its range (min-max), or, with KL pre-calibration (kl_qparams), that range
shrunk to the grid whose quantized weights are distributed most like the original ones.
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


def choose_qparams(W: Tensor, spec: QuantSpec, grid: str = "minmax") -> tuple[Tensor, Tensor]:
    """Scale and zero for each group of W [out, in] -> (scale, zero), each [out, n_groups] fp32.

    grid "minmax": the grid spans the group's range; "kl": the range shrunk as kl_qparams picks.
    The grid always contains 0 (min ≤ 0 ≤ max), as GPTQ's and llm-compressor's observers do.
    """
    match grid:
        case "minmax":
            return _qparams(*_range(_groups(W.float(), spec.group(W.shape[1]))), spec)
        case "kl":
            return kl_qparams(W, spec)
    raise ValueError(f"grid must be minmax or kl, got {grid!r}")


def _groups(W: Tensor, g: int) -> Tensor:
    """W [out, in] -> [out, n_groups, g]; a ragged last group is padded with zeros, which every grid holds."""
    return torch.nn.functional.pad(W, (0, -W.shape[1] % g)).reshape(W.shape[0], -1, g)


def _range(Wg: Tensor) -> tuple[Tensor, Tensor]:
    """Each group's range widened to hold 0: (lo, hi), each [out, n_groups]."""
    return Wg.amin(-1).clamp(max=0), Wg.amax(-1).clamp(min=0)


def _qparams(lo: Tensor, hi: Tensor, spec: QuantSpec) -> tuple[Tensor, Tensor]:
    """The stored grid spanning [lo, hi] (lo ≤ 0 ≤ hi) -> (scale, zero)."""
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


def rtn(W: Tensor, spec: QuantSpec, grid: str = "minmax") -> Quantized:
    """Round to nearest on each group's grid, chosen as `grid` says (choose_qparams)."""
    scale, zero = choose_qparams(W, spec, grid)
    return Quantized(quantize(W, scale, zero, spec), scale, zero, spec)


# KL pre-calibration's search: each group's range times 1.0 (min-max, tried first, so it wins ties),
# 0.99, ..., 0.5; histograms of 32 bins (about 4 weights a bin in a group of 128); empty bins of the
# quantized histogram get KL_EPS, so a weight the grid clips costs a large but finite amount
KL_SHRINKS = tuple(1 - k / 100 for k in range(51))
KL_BINS = 32
KL_EPS = 1e-6
_KL_CHUNK = 1 << 22  # weights per slice of rows searched at once: bounds memory on the widest Linears


def kl_qparams(W: Tensor, spec: QuantSpec) -> tuple[Tensor, Tensor]:
    """KL pre-calibration: for each group of W [out, in], the grid of the shrink factor a in
    KL_SHRINKS (the min-max range [lo, hi] scaled to [a·lo, a·hi]) whose quantized weights'
    histogram is closest to the original weights' in KL divergence (grid_kl) -> (scale, zero),
    each [out, n_groups], like choose_qparams. Data-free; per group, since each group has its own
    scale and its own outliers. Every scale is at most min-max's, and every group's KL at most
    min-max's (a = 1 is a candidate and keeps ties).
    """
    rows = max(1, _KL_CHUNK // W.shape[1])
    parts = [_kl_search(W[i : i + rows].float(), spec) for i in range(0, W.shape[0], rows)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def _kl_search(W: Tensor, spec: QuantSpec) -> tuple[Tensor, Tensor]:
    Wg, mask = _groups(W, spec.group(W.shape[1])), _groups(torch.ones_like(W), spec.group(W.shape[1]))
    lo, hi = _range(Wg)
    P = _histogram(Wg, mask, lo, hi)
    best_s, best_z = _qparams(lo, hi, spec)
    best = _kl(P, Wg, mask, lo, hi, best_s, best_z, spec)
    for a in KL_SHRINKS[1:]:
        s, z = _qparams(lo * a, hi * a, spec)
        kl = _kl(P, Wg, mask, lo, hi, s, z, spec)
        better = kl < best  # strictly: a tie keeps the wider grid
        best = torch.where(better, kl, best)
        best_s, best_z = torch.where(better, s, best_s), torch.where(better, z, best_z)
    return best_s, best_z


def grid_kl(W: Tensor, scale: Tensor, zero: Tensor, spec: QuantSpec) -> Tensor:
    """KL(P ‖ Q) of each group of W [out, in] -> [out, n_groups]: P the histogram of the group's
    weights, Q that of its weights quantized on (scale, zero), both over KL_BINS equal bins of the
    group's min-max range [lo, hi] (values outside it count in the end bins).

    Q spreads each quantized weight evenly over its rounding cell, [ŵ − scale/2, ŵ + scale/2]: the
    histogram of Ŵ at the grid's own resolution. Point masses at the grid's levels would leave the
    bins between levels empty, and the KL would then reward the densest levels, the smallest scale,
    whatever it clips (TensorRT's entropy calibration spreads its merged bins for the same reason).
    A clipped weight lands in its end level's cell, so the tail bins it left are empty in Q: the cost
    of clipping. Q's empty bins get KL_EPS so that the KL is finite.
    """
    W = W.float()
    Wg, mask = _groups(W, spec.group(W.shape[1])), _groups(torch.ones_like(W), spec.group(W.shape[1]))
    lo, hi = _range(Wg)
    return _kl(_histogram(Wg, mask, lo, hi), Wg, mask, lo, hi, scale.float(), zero.float(), spec)


def _histogram(Wg: Tensor, mask: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
    """P [out, n_groups, KL_BINS]: each group's weights (mask: the real ones) over its bins of [lo, hi]."""
    idx = ((Wg - lo[..., None]) / _bin_width(lo, hi)).floor().clamp(0, KL_BINS - 1).long()
    P = torch.zeros(*Wg.shape[:-1], KL_BINS, device=Wg.device).scatter_add_(-1, idx, mask)
    return P / mask.sum(-1, keepdim=True)


def _bin_width(lo: Tensor, hi: Tensor) -> Tensor:
    return ((hi - lo) / KL_BINS).clamp(min=1e-30)[..., None]  # an all-zero group: its first bin holds it all


def _kl(P: Tensor, Wg: Tensor, mask: Tensor, lo: Tensor, hi: Tensor, s: Tensor, z: Tensor,
        spec: QuantSpec) -> Tensor:
    """grid_kl on grouped weights [out, n_groups, g] and their histograms P, grid (s, z) [out, n_groups]."""
    levels = spec.maxq + 1
    q = (torch.round(Wg / s[..., None]) + z[..., None]).clamp(0, spec.maxq)  # quantize()'s codes
    count = torch.zeros(*Wg.shape[:-1], levels, device=Wg.device).scatter_add_(-1, q.long(), mask)
    below = torch.nn.functional.pad(count.cumsum(-1), (1, 0))  # [..., levels + 1]: weights under each code
    # Q's CDF at the bin edges: in units t = x/s + z + 1/2, code c's cell is [c, c + 1)
    edges = lo[..., None] + _bin_width(lo, hi) * torch.arange(KL_BINS + 1, device=Wg.device)
    t = (edges / s[..., None] + z[..., None] + 0.5).clamp(0, levels)
    c = t.floor().clamp(max=levels - 1).long()
    F = below.gather(-1, c) + count.gather(-1, c) * (t - c)
    F[..., 0], F[..., -1] = 0.0, count.sum(-1)  # cells beyond the range count in the end bins
    Q = F.diff(dim=-1) / count.sum(-1, keepdim=True)
    Q = (Q + KL_EPS) / (1 + KL_BINS * KL_EPS)
    return (torch.special.xlogy(P, P) - torch.special.xlogy(P, Q)).sum(-1)
