"""HQQ, Half-Quadratic Quantization (Badri & Shaji 2023): a calibration-free fit of each group's
grid to its weights under a sparsity-promoting l_p error (p < 1), robust to the few large weights
that min-max grids spend their levels on.

HQQ minimizes Σ |W − Ŵ|^p by half-quadratic splitting: an auxiliary error W_e takes the l_p term,
tied to W − Ŵ by a quadratic penalty of weight β,

    min  ‖W_e‖_p^p + β/2 ‖W_e − (W − Ŵ)‖²,        Ŵ = (q − zero)·scale,  q = round(W/scale) + zero,

and the two halves alternate, β growing by κ each time:
  1. W_e = shrink_p(W − Ŵ, β) = sign(x)·max(|x| − |x|^(p−1)/β, 0): errors too large for the
     penalty stay in W_e (they are given up), small ones go to 0 (they are to be fitted);
  2. the grid is fitted in closed form, by least squares, to the target W − W_e.

Our adaptation to integer zero points (compressed-tensors stores them as integers, so HQQ's float
zero cannot be kept) and float16 scales: step 2 fits both, one after the other —
  zero  = round(mean(q − (W − W_e)/scale)), clamped to [0, 2^bits − 1] (HQQ's closed form, then
          projected; the objective is quadratic in zero, so the rounded value is the best integer),
  scale = ⟨q − zero, W − W_e⟩ / ‖q − zero‖², rounded to float16 as stored,
and the codes are then re-rounded on the new grid. Unlike min-max, the grid need not span the
group: large weights may be clipped to the end codes when that lowers the l_p error. Symmetric
specs keep zero at 2^(bits−1); only the scale moves. The shrinkage acts on the error in units of
the current grid step (HQQ's acts on raw weights), so β does not depend on the weights' magnitude.
The iterations start from RTN's grid, and each group keeps the best grid it has seen under
Σ |W − Ŵ|^p on the stored (float16) scale, so no group ends worse than RTN under that objective;
the loop stops when no group improved. The squared error usually falls too, but not always: with
a few isolated, very large weights the l_p fit clips them and ‖W − Ŵ‖² can exceed RTN's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from .config import Quantize, require
from .grid import Quantized, QuantSpec, quantize, rtn


@dataclass(frozen=True)
class Hqq(Quantize):
    """HQQ (this module): each group's grid fitted to its weights under the l_p error, p = lp, for at
    most `iters` rounds from RTN's grid; no calibration data. Asymmetric grids are its natural case."""

    sym: bool = False
    group_size: int = 64
    iters: int = 20
    lp: float = 0.7
    beta: float = 10.0
    kappa: float = 1.01
    method: ClassVar[str] = "hqq"

    def validate(self) -> None:
        super().validate()
        require(self.iters >= 0, f"quantize.iters must be >= 0, got {self.iters}")
        require(0 < self.lp < 1, f"quantize.lp must be in (0, 1), got {self.lp}")
        require(self.beta > 0, f"quantize.beta must be > 0, got {self.beta}")
        require(self.kappa >= 1, f"quantize.kappa must be >= 1, got {self.kappa}")

    def quantize_weight(self, W: Tensor, spec: QuantSpec, stats, fisher, keep: Tensor | None) -> Quantized:
        return hqq(W, spec, iters=self.iters, p=self.lp, beta=self.beta, kappa=self.kappa)


def hqq(W: Tensor, spec: QuantSpec, *, iters: int = 20, p: float = 0.7, beta: float = 10.0,
        kappa: float = 1.01) -> Quantized:
    """HQQ's l_p grid fit of W [out, in] on `spec`'s grid, from RTN, for at most `iters` rounds.

    p: the error norm's exponent (< 1); beta: the initial half-quadratic penalty, on errors in grid
    steps; kappa: beta's growth per round. iters=0 is RTN.
    """
    init = rtn(W, spec)
    if iters <= 0:
        return init
    out, cols = W.shape
    Wg, mask = _grouped(W.float(), spec.group(cols))
    n = mask.sum(-1, keepdim=True)
    s, z = init.scale[..., None].clone(), init.zero[..., None].clone()
    best_s, best_z, best = s, z, _lp_error(Wg, mask, s, z, spec, p)
    for _ in range(iters):
        q = _codes(Wg, s, z, spec)
        E = (Wg - (q - z) * s) * mask
        target = Wg - _shrink(E / s, beta, p) * s
        if not spec.sym:
            z = ((q - target / s) * mask).sum(-1, keepdim=True).div(n).round().clamp(0, spec.maxq)
        d = (q - z) * mask
        den = d.square().sum(-1, keepdim=True)
        s_new = (d * target).sum(-1, keepdim=True) / den.clamp(min=1e-30)
        s = torch.where((den > 0) & (s_new > 0), s_new.clamp(2**-24, 65504.0).half().float(), s)
        beta *= kappa
        err = _lp_error(Wg, mask, s, z, spec, p)
        better = err < best
        if not better.any():
            break
        best = torch.where(better, err, best)
        best_s, best_z = torch.where(better, s, best_s), torch.where(better, z, best_z)
    scale, zero = best_s[..., 0], best_z[..., 0]
    return Quantized(quantize(W, scale, zero, spec), scale, zero, spec)


def _grouped(W: Tensor, g: int) -> tuple[Tensor, Tensor]:
    """W [out, in] -> (W, mask) [out, n_groups, g]; the ragged last group is padded, masked out."""
    pad = -W.shape[1] % g
    mask = torch.nn.functional.pad(torch.ones_like(W), (0, pad)).reshape(W.shape[0], -1, g)
    return torch.nn.functional.pad(W, (0, pad)).reshape(W.shape[0], -1, g), mask


def _codes(Wg: Tensor, s: Tensor, z: Tensor, spec: QuantSpec) -> Tensor:
    return (torch.round(Wg / s) + z).clamp(0, spec.maxq)  # grid.quantize's rounding, grouped


def _shrink(x: Tensor, beta: float, p: float) -> Tensor:
    """The l_p proximal step of HQQ (generalized soft thresholding); 0 stays 0."""
    a = x.abs()
    return torch.sign(x) * torch.relu(a - a.pow(p - 1) / beta)


def _lp_error(Wg: Tensor, mask: Tensor, s: Tensor, z: Tensor, spec: QuantSpec, p: float) -> Tensor:
    """Σ |W − Ŵ|^p per group [out, n_groups, 1]."""
    return ((Wg - (_codes(Wg, s, z, spec) - z) * s) * mask).abs().pow(p).sum(-1, keepdim=True)
