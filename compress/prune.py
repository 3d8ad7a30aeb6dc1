"""Mask selection and pruning of one Linear.

Score, selection and update are separate: a scorer ranks weights (scores.py), `select_mask` turns
scores into an exact mask (per row, per layer or N:M), and SparseGPT adds the OBS update.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from .config import Prune, require
from .model import set_weight_matrix_, weight_matrix
from .obs import obs_sweep
from .scores import SCORERS, obs_saliency
from .stats import LinearStats


@dataclass(frozen=True)
class Magnitude(Prune):
    """Drop the smallest |W| (no calibration data)."""

    method: ClassVar[str] = "magnitude"


@dataclass(frozen=True)
class Wanda(Prune):
    """Wanda (Sun et al. 2024): drop the smallest |W_ij|·‖x_j‖, no weight update."""

    method: ClassVar[str] = "wanda"
    reads: ClassVar[frozenset[str]] = frozenset({"x_sq"})


@dataclass(frozen=True)
class SparseGpt(Prune):
    """SparseGPT (Frantar and Alistarh 2023): the mask chosen per block of `block_size` columns from
    the OBS saliency, the pruning error pushed onto the later columns through H⁻¹ (damped by damp)."""

    block_size: int = 128
    damp: float = 0.01
    method: ClassVar[str] = "sparsegpt"
    reads: ClassVar[frozenset[str]] = frozenset({"xtx"})

    def validate(self) -> None:
        super().validate()
        require(self.block_size >= 1, f"prune.block_size must be >= 1, got {self.block_size}")
        require(self.damp > 0, f"prune.damp must be > 0, got {self.damp}")
        require(self.n_m is None or self.block_size % self.n_m[1] == 0,
                f"prune.block_size {self.block_size} must be a multiple of M={self.n_m and self.n_m[1]}")


def select_mask(
    score: Tensor, sparsity: float, n_m: tuple[int, int] | None = None, *, per_row: bool = True
) -> Tensor:
    """Bool keep-mask [out, in] that drops the lowest scores.

    Unstructured: exactly round(sparsity · in) weights dropped in every row (per_row), or
    round(sparsity · out · in) in the whole matrix. N:M: the N highest of every M consecutive
    inputs are kept (in_features must be a multiple of M).
    """
    rows, cols = score.shape
    if n_m is not None:
        n, m = n_m
        if cols % m:
            raise ValueError(f"{n}:{m} sparsity needs in_features divisible by {m}, got {cols}")
        groups = score.reshape(rows, cols // m, m)
        top = groups.topk(n, dim=-1).indices
        keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, top, True)
        return keep.reshape(rows, cols)
    if per_row:
        return _drop_lowest(score, round(sparsity * cols))
    return _drop_lowest(score.reshape(1, -1), round(sparsity * score.numel())).reshape(rows, cols)


def _drop_lowest(score: Tensor, k: int) -> Tensor:
    """Per row of score [r, c], False at the k lowest entries."""
    keep = torch.ones_like(score, dtype=torch.bool)
    if k > 0:
        keep.scatter_(1, score.topk(k, dim=1, largest=False).indices, False)
    return keep


def prune_linear(linear: nn.Module, step: Prune, stats: LinearStats) -> dict:
    """Prune `linear` in place as `step` says; returns metrics (sparsity, relative error)."""
    W = weight_matrix(linear).detach().float().clone()  # [out, in]; the original, for the error
    if step.n_m is not None and W.shape[1] % step.n_m[1]:
        n, m = step.n_m
        raise ValueError(f"{n}:{m} sparsity needs in_features divisible by {m}, got {W.shape[1]}")
    damp = 0.0
    if isinstance(step, SparseGpt):
        if stats.xtx_upper is None or stats.n_tokens == 0:
            raise ValueError("sparsegpt needs calibration inputs, but this Linear received none")
        sweep = obs_sweep(
            W, stats.hessian, choose_keep=_sparsegpt_chooser(step, W.shape[1]),
            block_size=step.block_size, mask_every=step.n_m[1] if step.n_m else None, damp=step.damp,
        )
        W_new, damp = sweep.W, sweep.damp
    else:
        if step.method == "wanda" and stats.n_tokens == 0:
            raise ValueError("wanda needs calibration inputs, but this Linear received none")
        keep = select_mask(SCORERS[step.method](W, stats), step.sparsity, step.n_m, per_row=step.scope == "row")
        W_new = W * keep
    set_weight_matrix_(linear, W_new)
    metrics = {"sparsity": (W_new == 0).float().mean().item(), "error": relative_error(W, W_new, stats)}
    if isinstance(step, SparseGpt) and damp > step.damp:
        metrics["damp"] = damp  # H needed more damping than asked (obs.damped_inverse_cholesky)
    return metrics


def _sparsegpt_chooser(step: SparseGpt, cols: int):
    """SparseGPT's adaptive mask: chosen per block from the OBS saliency of the current weights.

    Unstructured masks drop round(s·b1) − round(s·b0) weights per row in columns [b0, b1), so every
    row ends with exactly round(s · in) zeros; with scope "layer" the count is per block instead.
    """
    s = step.sparsity

    def choose(W1: Tensor, hinv_diag: Tensor, b0: int) -> Tensor:
        score = obs_saliency(W1, hinv_diag)
        if step.n_m is not None:
            return select_mask(score, s, step.n_m)
        b1 = b0 + W1.shape[1]
        k = round(s * b1) - round(s * b0)
        if step.scope == "row":
            return _drop_lowest(score, k)
        rows = W1.shape[0]
        k_all = round(s * b1 * rows) - round(s * b0 * rows)
        return _drop_lowest(score.reshape(1, -1), k_all).reshape(score.shape)

    return choose


def relative_error(W: Tensor, W_new: Tensor, stats: LinearStats) -> float:
    """‖(W − Ŵ)X‖² / ‖WX‖² on the calibration inputs: exact with XᵀX, from its diagonal with Σx²
    alone, and in weight space (‖W − Ŵ‖² / ‖W‖²) when no inputs were observed."""
    D = W - W_new
    if stats.xtx_upper is not None and stats.n_tokens:
        H = stats.xtx.to(W.device)
        num, den = ((D @ H) * D).sum(), ((W @ H) * W).sum()
    elif stats.x_sq is not None and stats.n_tokens:
        x_sq = stats.x_sq.to(W.device)
        num, den = (D.square() * x_sq).sum(), (W.square() * x_sq).sum()
    else:
        num, den = D.square().sum(), W.square().sum()
    return (num / den).item() if den > 0 else 0.0
