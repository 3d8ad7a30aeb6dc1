"""OWQ: outlier-aware weight quantization (Lee et al., AAAI 2024).

A few input columns of a Linear carry most of its quantization loss: those fed by activation
outliers (large H_jj) whose weights also round badly. OWQ keeps these "weak columns" in float16
and quantizes the rest with GPTQ. Column j's sensitivity is the layer loss its rounding alone
would cause, read off the Hessian's diagonal (the paper's Eq. 6):

    λ_j = H_jj · ‖ΔW_{:,j}‖²        ΔW = W − RTN(W) on the layer's grid

Stored layout (layers.OutlierQuantLinear): the quantized part over all `in` columns in the
pack-quantized layout, with the weak columns' codes at the zero point (so they dequantize to
exactly 0), plus weight_outlier float16 [out, k] and outlier_idx int32 [k]:

    y = x Ŵ_qᵀ + x[:, idx] W_outlierᵀ + b
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .grid import Quantized, QuantSpec, choose_qparams, expand_groups, rtn
from .obs import obs_sweep


@dataclass
class OutlierQuantized(Quantized):
    """A quantized matrix whose weak columns are kept in float16 (the codes there dequantize to 0)."""

    outlier_idx: Tensor | None = None  # int64 [k], ascending
    outlier: Tensor | None = None  # fp32 [out, k], float16-representable

    @property
    def weight(self) -> Tensor:
        W = super().weight
        W[:, self.outlier_idx] = self.outlier
        return W

    @property
    def avg_bits(self) -> float:
        """Stored bits per weight: the quantized part (codes of every column, scales, zero points)
        plus 16 bits per kept weight and a 32-bit index per kept column."""
        out, cols = self.codes.shape
        return super().avg_bits + self.outlier_idx.numel() * (16 * out + 32) / (out * cols)


def outlier_count(cols: int, fraction: float) -> int:
    """Weak columns kept for a Linear with `cols` inputs: fraction · cols rounded, at least one."""
    return 0 if fraction <= 0 else min(cols - 1, max(1, round(fraction * cols)))


def weak_columns(W: Tensor, H: Tensor, spec: QuantSpec, k: int) -> Tensor:
    """The k input columns of W [out, in] with the largest OWQ sensitivity H_jj · ‖W_:j − RTN(W)_:j‖²,
    ascending (int64 [k])."""
    delta = W.float() - rtn(W.float(), spec).weight
    sensitivity = H.diagonal().float() * delta.square().sum(0)
    return torch.topk(sensitivity, k).indices.sort().values


def owq(
    W: Tensor,
    H: Tensor,
    spec: QuantSpec,
    k: int,
    *,
    feedback: bool = True,
    keep: Tensor | None = None,
    act_order: bool = False,
    block_size: int = 128,
    damp: float = 0.01,
) -> OutlierQuantized:
    """OWQ: keep the k weak columns of W [out, in] in float16 and GPTQ-quantize the others.

    feedback True (OWQ's reference code): the sweep visits the quantized columns first and the weak
    columns last, so the rounding errors of the others are pushed onto them too through H⁻¹ (they
    are never rounded to the grid, so every bit of compensation they absorb is kept); they are then
    stored as float16 of their updated values. feedback False: the weak columns keep their original
    values (bit-exact when W is float16) and the sweep runs over the other columns alone, on
    H restricted to them. Groups take their grids from the weights before the sweep (static: the
    visiting order skips the weak columns, so groups cannot be chosen as the sweep enters them),
    with the weak columns read as 0, their stored value in the quantized part. `act_order` visits
    the quantized columns by decreasing H_jj. `keep` [out, in] bool: weights that must become 0.
    """
    out, cols = W.shape
    W = W.float() if keep is None else W.float() * keep
    idx = weak_columns(W, H, spec, k)
    weak = torch.zeros(cols, dtype=torch.bool, device=W.device)
    weak[idx] = True
    base = W.masked_fill(weak, 0.0)
    scale, zero = choose_qparams(base, spec)
    g = spec.group(cols)
    s_col, z_col = expand_groups(scale, g, cols).t().contiguous(), expand_groups(zero, g, cols).t().contiguous()
    codes_t = z_col.to(torch.uint8)  # [in, out]; the weak columns stay at the zero point
    rest = (~weak).nonzero().squeeze(1)
    if act_order:
        rest = rest[torch.argsort(H.diagonal()[rest], descending=True, stable=True)]
    order = torch.cat([rest, idx]) if feedback else rest

    def project(pos: int, q: Tensor, _rest: Tensor, _keep: Tensor | None) -> Tensor:
        col = int(order[pos])
        if weak[col]:
            return q.half().float()  # stored in float16; the rounding error moves on to the later weak columns
        c = torch.round(q / s_col[col]).add_(z_col[col]).clamp_(0, spec.maxq)
        codes_t[col] = c
        return c.sub_(z_col[col]).mul_(s_col[col])

    if feedback:
        sweep = obs_sweep(W, H, keep=keep, project=project, perm=order, block_size=block_size, damp=damp)
        outlier = sweep.W[:, idx]
    else:
        sweep = obs_sweep(W[:, rest], H[rest][:, rest], keep=None if keep is None else keep[:, rest],
                          project=project, block_size=block_size, damp=damp)  # the codes are what it leaves
        outlier = W[:, idx].half().float()
    return OutlierQuantized(codes_t.t().contiguous(), scale, zero, spec, sweep.damp, outlier_idx=idx, outlier=outlier)


def bits_with_outliers(out: int, cols: int, spec: QuantSpec, fraction: float) -> float:
    """The avg_bits an OWQ Linear of this shape stores (without building it)."""
    groups = math.ceil(cols / spec.group(cols))
    k = outlier_count(cols, fraction)
    return spec.bits + groups * (16 + (0 if spec.sym else spec.bits)) / cols + k * (16 * out + 32) / (out * cols)
