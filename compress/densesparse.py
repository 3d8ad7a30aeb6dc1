"""Dense-and-sparse quantization (SqueezeLLM, Kim et al. 2024, §4.2; ReQuant, Hu et al. 2025).

A few single weights of a Linear cost most of its rounding loss, or stretch the grids of their
groups for every other weight. W is split into a quantized dense part and a sparse part that
keeps those weights in float16:

    W = D + S,    D quantized (RTN or GPTQ) with zeros where S holds a weight,  S: k weights in float16

The k weights of S are chosen first, by a score (`sparse_score`), and taken out of W before any
grid is chosen, so the scales of their groups see a smaller range:

    sensitivity   H_jj · (W_ij − RTN(W)_ij)²   the diagonal part of the layer loss tr(ΔW H ΔWᵀ)
                                               that rounding weight ij alone adds (H = 2XᵀX/n)
    magnitude     |W_ij|                       SqueezeLLM's outliers: the extremes of the grids

Where this differs from the papers: SqueezeLLM ranks sensitive weights by the diagonal Fisher
and ReQuant by its post-quantization integral (the loss change along the path from W to Ŵ, from
gradients of the whole model); both need backward passes over the model. Here the layer's own
Hessian diagonal stands in, from the streaming pass's XᵀX, so the score costs nothing extra.
ReQuant also detaches step by step and re-scores; this is one shot.

Under GPTQ the sweep does not round the detached weights: each keeps its current value (it
absorbs the compensation of the columns before it, as SpQR's outliers do) and carries no error
into the feedback; its float16 value is what S stores. Under RTN S stores the original weights.

Stored layout (layers.DenseSparseLinear): the dense part as a pack-quantized QuantLinear whose
codes at S's positions sit at the zero point (so they dequantize to exactly 0), plus
weight_sparse float16 [k] and sparse_idx int32 [k] (row · in + col, ascending):

    y = x Dᵀ + x Sᵀ + b
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from .gptq import gptq_sweep
from .grid import Quantized, QuantSpec, rtn
from .scores import rounding_sensitivity


@dataclass
class DenseSparseQuantized(Quantized):
    """A quantized dense matrix with k single weights kept in float16 (their codes dequantize to 0)."""

    sparse_idx: Tensor | None = None  # int64 [k], row · in + col, ascending
    sparse: Tensor | None = None  # fp32 [k], float16-representable

    @property
    def weight(self) -> Tensor:
        W = super().weight
        W.view(-1)[self.sparse_idx] = self.sparse
        return W

    @property
    def avg_bits(self) -> float:
        """Stored bits per weight: the dense part (codes of every weight, scales, zero points) plus
        16 bits of value and a 32-bit index per detached weight."""
        return super().avg_bits + self.sparse_idx.numel() * (16 + 32) / self.codes.numel()


def sparse_count(numel: int, fraction: float) -> int:
    """Weights detached from a Linear with `numel` weights: fraction · numel rounded, at least one."""
    return 0 if fraction <= 0 else min(numel - 1, max(1, round(fraction * numel)))


def detach_scores(W: Tensor, spec: QuantSpec, score: Literal["sensitivity", "magnitude"],
                  h_diag: Tensor | None = None) -> Tensor:
    """[out, in] scores of the weights of W; the top ones are detached (module docstring)."""
    if score == "magnitude":
        return W.abs().float()
    if h_diag is None:
        raise ValueError("sparse_score sensitivity needs the Linear's calibration Hessian")
    return rounding_sensitivity(W, rtn(W.float(), spec).weight, h_diag)


def select_detached(scores: Tensor, k: int, keep: Tensor | None = None) -> Tensor:
    """Flat indices (int64 [k], ascending) of the k top-scoring weights; weights outside `keep` (an
    earlier prune step's zeros) are never picked."""
    s = scores.float().flatten()
    if keep is not None:
        s = s.masked_fill(~keep.flatten(), float("-inf"))
    return torch.topk(s, k).indices.sort().values


def dense_and_sparse(
    W: Tensor,
    spec: QuantSpec,
    k: int,
    *,
    score: Literal["sensitivity", "magnitude"] = "sensitivity",
    H: Tensor | None = None,
    method: Literal["rtn", "gptq"] = "gptq",
    keep: Tensor | None = None,
    act_order: bool = False,
    static_groups: bool = False,
    block_size: int = 128,
    damp: float = 0.01,
) -> DenseSparseQuantized:
    """Detach the k top-scoring weights of W [out, in] into float16 and quantize the rest with
    `method` (GPTQ on H [in, in]); `keep` [out, in] bool: weights that must become 0."""
    W = W.float() if keep is None else W.float() * keep
    idx = select_detached(detach_scores(W, spec, score, None if H is None else H.diagonal()), k, keep)
    detached = torch.zeros(W.numel(), dtype=torch.bool, device=W.device)
    detached[idx] = True
    detached = detached.view_as(W)
    if method == "gptq":
        if H is None:
            raise ValueError("gptq needs the Linear's calibration Hessian")
        q, swept = gptq_sweep(W, H, spec, keep=keep, act_order=act_order, static_groups=static_groups,
                              block_size=block_size, damp=damp, detached=detached)
        sparse = swept.reshape(-1)[idx]  # the float16 values the sweep kept there
    else:
        q = rtn(W.masked_fill(detached, 0.0), spec)  # 0 is on every grid: the codes there dequantize to 0
        sparse = W.reshape(-1)[idx].half().float()
    return DenseSparseQuantized(q.codes, q.scale, q.zero, spec, q.damp, sparse_idx=idx, sparse=sparse)

