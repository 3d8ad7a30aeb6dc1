"""Importance scores of individual weights. Every scorer maps (W [out, in], stats) to [out, in];
higher means keep."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .stats import LinearStats

Scorer = Callable[[Tensor, LinearStats], Tensor]


def magnitude(W: Tensor, stats: LinearStats) -> Tensor:
    return W.abs()


def wanda(W: Tensor, stats: LinearStats) -> Tensor:
    """|W_ij| · ‖X_j‖₂ (Sun et al. 2023, Eq. 1): the weight times the norm of the input it scales."""
    return wanda_metric(W, stats.x_norm)


def wanda_metric(W: Tensor, x_norm: Tensor) -> Tensor:
    return W.abs() * x_norm.to(W.device).unsqueeze(0)


def obs_saliency(W: Tensor, hinv_diag: Tensor) -> Tensor:
    """w² / [H⁻¹]_jj, the OBS loss of zeroing one weight (SparseGPT's mask criterion)."""
    return W.square() / hinv_diag.unsqueeze(0)


SCORERS: dict[str, Scorer] = {"magnitude": magnitude, "wanda": wanda}


# Layer-wise scores: one number per Linear or per decoder block, the inputs of budget allocation.


def fisher_saliency(W: Tensor, fisher_diag: Tensor) -> Tensor:
    """½ F_ij W_ij², the loss increase of zeroing one weight under a diagonal Fisher (OBD)."""
    return 0.5 * fisher_diag.to(W.device) * W.square()


def block_influence(h_in: Tensor, h_out: Tensor) -> float:
    """1 − cos(h_in, h_out) averaged over tokens (ShortGPT): how much a block changes its input."""
    cos = torch.nn.functional.cosine_similarity(h_in.float(), h_out.float(), dim=-1)
    return float(1 - cos.mean())


def outlier_count(W: Tensor, x_norm: Tensor, m: float) -> int:
    """OWL: how many Wanda scores |W_ij|·‖X_j‖ exceed m times the layer's mean score."""
    score = wanda_metric(W, x_norm)
    return int((score > m * score.mean()).sum())


def outlier_ratio(layers: list[tuple[Tensor, Tensor]], m: float) -> float:
    """OWL's score of a block from its layers' (W, ‖X‖) pairs: the share of all its weights whose
    Wanda score exceeds m times their own layer's mean."""
    return sum(outlier_count(W, x_norm, m) for W, x_norm in layers) / sum(W.numel() for W, _ in layers)


def wanda_median(layers: list[tuple[Tensor, Tensor]]) -> float:
    """DLP's score of a block from its layers' (W, ‖X‖) pairs: the median Wanda score over all of
    them, which DLP reads as the block's unimportance."""
    return float(torch.cat([wanda_metric(W, x_norm).flatten() for W, x_norm in layers]).median())


def large_weight_fraction(W: Tensor) -> float:
    """Fraction of weights more than one standard deviation from the layer mean (the z-score
    count that layer-wise quantization uses to rank layers)."""
    W = W.float()
    return float(((W - W.mean()).abs() > W.std()).float().mean())


def lamp(W: Tensor) -> Tensor:
    """LAMP score w² / Σ_{|v| ≥ |w|} v² over the layer (Lee et al. 2021): comparable across layers,
    so one global threshold on it sets every layer's sparsity."""
    sq = W.float().square().flatten()
    order = sq.argsort()
    tail = sq[order].flip(0).cumsum(0).flip(0)  # Σ of this and every larger weight
    out = torch.empty_like(sq)
    out[order] = sq[order] / tail
    return out.reshape(W.shape)



def rounding_sensitivity(W: Tensor, W_hat: Tensor, h_diag: Tensor) -> Tensor:
    """H_jj · (W_ij − Ŵ_ij)²: the layer loss tr(ΔW H ΔWᵀ) that rounding weight ij alone adds, its
    diagonal term (OWQ scores whole columns by its column sums; dense-and-sparse detaches the top
    weights by it, densesparse.py). Higher means more to lose by rounding."""
    return h_diag.to(W.device).float().unsqueeze(0) * (W.float() - W_hat.float()).square()
