"""Low-rank factorization of Linears: W [out, in] ≈ U [out, r] · V [r, in].

Every method here is one truncated SVD in a weighted norm. With a left weight P (P Pᵀ weighs the
outputs) and a right weight Q (Q Qᵀ weighs the inputs), the best rank-r U·V under
‖Pᵀ (W − U V) Q‖_F is the truncated SVD of M = Pᵀ W Q, mapped back with P⁻ᵀ and Q⁻¹ (Eckart-Young
in the weighted space). The methods differ only in P and Q:

    svd       P = I, Q = I
    whitened  Q = chol(XᵀX): the layer's output error ‖(W − UV) X‖ on the calibration inputs (SVD-LLM)
    asvd      Q = diag(rms(x)^α): input columns scaled by their activation size (ASVD)
    fwsvd     P = diag(√(Σ_j F_ij)): rows weighted by their Fisher information (FWSVD)
    gfwsvd    P = chol(G), Q = chol(A) with F ≈ G ⊗ A (K-FAC): ½‖Pᵀ ΔW Q‖² is the second-order
              loss increase under the Kronecker-factored Fisher (GFWSVD)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import Tensor, nn

from .config import StepConfig, require
from .model import set_weight_matrix_, weight_matrix
from .obs import RETRIES
from .stats import FisherStats, LinearStats


@dataclass(frozen=True)
class LowRank(StepConfig):
    """Replace each targeted Linear by two smaller ones, W ≈ U·V (layers.LowRankLinear).

    keep: fraction of each layer's parameters kept; the rank is ⌊keep·in·out / (in + out)⌋.
    method (lowrank.py): "svd" (plain truncated SVD of W); "whitened" (SVD-LLM: W·L with L Lᵀ = XᵀX,
    so the truncation is optimal for the layer's output on the calibration inputs); "asvd" (ASVD:
    input columns scaled by their activation RMS to the power asvd_alpha); "fwsvd" (rows weighted
    by the row sums of the diagonal Fisher, FWSVD); "gfwsvd" (both Kronecker factors of the
    Fisher, F ≈ G ⊗ A, weight the output and input sides, GFWSVD). The Fisher is taken on the dense
    model from the first calib.score_samples windows.
    """

    method: Literal["svd", "whitened", "asvd", "fwsvd", "gfwsvd"] = "whitened"
    keep: float = 0.8
    damp: float = 0.01  # added to the weighting matrices, relative to the mean of their diagonal
    asvd_alpha: float = 0.5
    targets: tuple[str, ...] = ("*",)
    ignore: tuple[str, ...] = ()
    kind: ClassVar[str] = "lowrank"

    @property
    def needs(self) -> set[str]:
        return {"svd": set(), "whitened": {"xtx"}, "asvd": {"x_sq"}, "fwsvd": set(), "gfwsvd": set()}[self.method]

    @property
    def needs_data(self) -> bool:
        return self.method != "svd"

    def validate(self) -> None:
        require(0.0 < self.keep < 1.0, f"lowrank.keep must be in (0, 1), got {self.keep}")
        require(self.damp > 0, f"lowrank.damp must be > 0, got {self.damp}")
        require(self.asvd_alpha > 0, f"lowrank.asvd_alpha must be > 0, got {self.asvd_alpha}")


def rank_for(in_features: int, out_features: int, keep: float) -> int:
    """The largest rank whose two factors hold at most `keep` of the layer's parameters (at least 1)."""
    return max(1, int(keep * in_features * out_features / (in_features + out_features)))


def weighted_svd(W: Tensor, rank: int, left: Tensor | None = None, right: Tensor | None = None
                 ) -> tuple[Tensor, Tensor, Tensor]:
    """(U [out, r], V [r, in], σ) minimizing ‖leftᵀ (W − U V) right‖_F, with σ the singular values of
    leftᵀ W right (their tail beyond r is the weighted error). `left` and `right` are lower
    triangular (Cholesky factors) or 1-D (diagonal weights); None is the identity."""
    M = W.double()
    if right is not None:
        M = M * right.double() if right.dim() == 1 else M @ right.double()
    if left is not None:
        M = left.double().unsqueeze(1) * M if left.dim() == 1 else left.double().t() @ M
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    root = S[:rank].sqrt()
    U, V = U[:, :rank] * root, root.unsqueeze(1) * Vh[:rank]
    if right is not None:  # V ← V right⁻¹
        V = V / right.double() if right.dim() == 1 else torch.linalg.solve_triangular(
            right.double(), V, upper=False, left=False)
    if left is not None:  # U ← left⁻ᵀ U
        U = U / left.double().unsqueeze(1) if left.dim() == 1 else torch.linalg.solve_triangular(
            left.double().t(), U, upper=True)
    return U.to(W.dtype), V.to(W.dtype), S.float()


def damped_cholesky(A: Tensor, damp: float) -> tuple[Tensor, float]:
    """(Lower Cholesky factor of A + d·mean(diag A)·I, d): d is `damp`, raised tenfold up to
    obs.RETRIES times while A + d·mean(diag A)·I is not positive definite in floating point."""
    if not torch.isfinite(A).all():
        raise ValueError("the weighting matrix (XᵀX or Fisher) has NaN or inf entries: the layer's inputs "
                         "overflowed (in float16: try --dtype bfloat16 or float32)")
    A = A.double()
    eye = torch.eye(A.shape[0], dtype=A.dtype, device=A.device)
    base = A.diagonal().mean().clamp_min(1e-12)
    for attempt in range(RETRIES + 1):
        used = damp * 10**attempt
        L, info = torch.linalg.cholesky_ex(A + used * base * eye)
        if info == 0:
            return L, used
    raise ValueError(f"the weighting matrix is not positive definite even with damp {used:g} "
                     f"({10**RETRIES}x the recipe's {damp:g}); give more calibration samples or raise lowrank.damp")


def weights_for(step: LowRank, W: Tensor, stats: LinearStats, fisher: FisherStats | None
                ) -> tuple[Tensor | None, Tensor | None, float]:
    """(left, right) weights of `step.method` for one Linear (see the module docstring), and the
    damping used (more than step.damp where a Cholesky factor needed it)."""
    match step.method:
        case "svd":
            return None, None, step.damp
        case "whitened":
            return None, *damped_cholesky(stats.xtx, step.damp)
        case "asvd":
            rms = (stats.x_sq / max(stats.n_tokens, 1)).sqrt()
            rms = rms + step.damp * rms.mean().clamp_min(1e-12)
            return None, rms.pow(step.asvd_alpha), step.damp
        case "fwsvd":
            rows = _need(fisher, step).diagonal.sum(1)
            return (rows + step.damp * rows.mean().clamp_min(1e-30)).sqrt(), None, step.damp
        case "gfwsvd":
            A, G = _need(fisher, step).kfac
            (left, d_left), (right, d_right) = damped_cholesky(G, step.damp), damped_cholesky(A, step.damp)
            return left, right, max(d_left, d_right)
    raise ValueError(f"unknown lowrank method {step.method!r}")


def _need(fisher: FisherStats | None, step: LowRank) -> FisherStats:
    if fisher is None:
        raise ValueError(f"lowrank {step.method} needs the Fisher of this Linear (calibration data)")
    return fisher


@torch.no_grad()
def lowrank_linear(linear: nn.Module, step: LowRank, stats: LinearStats, fisher: FisherStats | None = None
                   ) -> tuple[dict, tuple[Tensor, Tensor]]:
    """Factor one Linear as `step` says. Its weight is overwritten in place by U·V (so the samples of
    the streaming pass see the factored layer); returns (metrics, (U, V)) for the LowRankLinear.

    metrics: rank, keep (parameters kept) and error, the weighted truncation error relative to the
    weighted norm of W (Σ_{i>r} σ² / Σ σ²; for "whitened" the relative output error on calibration).
    """
    W = weight_matrix(linear).float()
    out_f, in_f = W.shape
    rank = rank_for(in_f, out_f, step.keep)
    left, right, damp = weights_for(step, W, stats, fisher)
    U, V, S = weighted_svd(W, rank, left, right)
    set_weight_matrix_(linear, U @ V)
    energy = S.square()
    metrics = {"rank": rank, "keep": rank * (in_f + out_f) / (in_f * out_f),
               "error": (energy[rank:].sum() / energy.sum().clamp_min(1e-30)).item()}
    if damp > step.damp:
        metrics["damp"] = damp
    return metrics, (U, V)
