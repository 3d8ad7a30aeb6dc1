"""Importance scores of individual weights. Every scorer maps (W [out, in], stats) to [out, in];
higher means keep."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from .stats import LinearStats

Scorer = Callable[[Tensor, LinearStats], Tensor]


def magnitude(W: Tensor, stats: LinearStats) -> Tensor:
    return W.abs()


def wanda(W: Tensor, stats: LinearStats) -> Tensor:
    """|W_ij| · ‖X_j‖₂ (Sun et al. 2023, Eq. 1): the weight times the norm of the input it scales."""
    return W.abs() * stats.x_norm.to(W.device).unsqueeze(0)


def obs_saliency(W: Tensor, hinv_diag: Tensor) -> Tensor:
    """w² / [H⁻¹]_jj, the OBS loss of zeroing one weight (SparseGPT's mask criterion)."""
    return W.square() / hinv_diag.unsqueeze(0)


SCORERS: dict[str, Scorer] = {"magnitude": magnitude, "wanda": wanda}
