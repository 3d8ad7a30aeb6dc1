"""The Optimal Brain Surgeon column sweep shared by SparseGPT (and GPTQ, in the quantization step).

Both methods visit the columns of W left to right, replace each column by its compressed value
(zeroed where the mask says so, or rounded to a grid), and push the error onto the columns not yet
visited through the inverse Hessian, so that ‖(W − Ŵ)X‖² stays small.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor


def damped_inverse_cholesky(H: Tensor, damp: float) -> tuple[Tensor, Tensor]:
    """Upper Cholesky factor U of (H + λI)⁻¹ (so (H + λI)⁻¹ = UᵀU), λ = damp · mean(diag H).

    Dead inputs (H_jj = 0: a column that never saw a non-zero input) get H_jj = 1 so H stays
    invertible; their weights cannot affect the output. If H is still not positive definite the
    damping is raised tenfold, up to three times. Returns (U, dead) with dead a bool [in] mask.
    """
    H = H.clone()
    dead = H.diagonal() == 0
    H[dead, dead] = 1.0
    mean_diag = H.diagonal().mean()
    for attempt in range(4):
        lam = damp * (10**attempt) * mean_diag
        L, info = torch.linalg.cholesky_ex(H + lam * torch.eye(H.shape[0], dtype=H.dtype, device=H.device))
        if info == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if info == 0:
                return U, dead
    raise ValueError("the calibration Hessian is not positive definite even with 1000x damping")


@contextmanager
def _single_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@dataclass
class Sweep:
    W: Tensor  # [out, in] fp32, the compressed weights
    keep: Tensor  # [out, in] bool, the mask that was applied


ChooseKeep = Callable[[Tensor, Tensor, int], Tensor]  # (W_blk, diag(Hinv_blk), first column) -> keep_blk


def obs_sweep(
    W: Tensor,
    H: Tensor,
    *,
    choose_keep: ChooseKeep,
    block_size: int = 128,
    mask_every: int | None = None,
    damp: float = 0.01,
) -> Sweep:
    """OBS column sweep (SparseGPT, Frantar & Alistarh 2023, Alg. 1).

    Every `mask_every` columns (default: once per block of `block_size`; M for N:M patterns),
    `choose_keep` picks the mask of the next columns from the weights as they stand after the
    updates so far and the inverse-Hessian diagonal. Column by column:
        q_j   = w_j · keep_j                          (the compressed column)
        err_j = (w_j − q_j) / [H⁻¹]_jj
        W[:, j:] −= err_j · [H⁻¹]_j,j:                (so column j becomes q_j exactly)
    and the block's errors are pushed onto the later blocks in one matmul (lazy batch update).
    H⁻¹ enters through its upper Cholesky factor U, whose rows give the needed [H⁻¹]_j,j: up to a
    per-row scale (GPTQ's reformulation), which is numerically stable.

    Args:
        W: [out, in] weights (not modified). H: [in, in] Hessian, 2XᵀX/n.
    Returns:
        Sweep with the updated weights (zeros exactly where keep is False) and the mask.
    """
    U, dead = damped_inverse_cholesky(H.float().to(W.device), damp)
    Wt = W.detach().float().t().contiguous()  # [in, out]: column j of W is the contiguous row Wt[j]
    Wt[dead] = 0.0
    cols = Wt.shape[0]
    keep_t = torch.ones_like(Wt, dtype=torch.bool)
    every = mask_every or block_size
    for b0 in range(0, cols, block_size):
        b1 = min(b0 + block_size, cols)
        W1, U1, keep1 = Wt[b0:b1], U[b0:b1, b0:b1], keep_t[b0:b1]  # views: updates land in Wt
        d1 = U1.diagonal().square()  # [H⁻¹]_jj of the columns still to come, at each step
        Err1 = torch.empty_like(W1)
        with _single_thread():  # the column updates are too small to split across threads
            for j in range(b1 - b0):
                if j % every == 0:
                    e = min(j + every, b1 - b0)
                    keep1[j:e] = choose_keep(W1[j:e].t(), d1[j:e], b0 + j).t()
                w = W1[j]
                err = Err1[j]
                torch.mul(w, ~keep1[j], out=err).div_(U1[j, j])  # (w − q) / [H⁻¹]_jj
                W1[j:].addr_(U1[j, j:], err, alpha=-1.0)  # so column j becomes q
                w.mul_(keep1[j])  # exact zeros, free of rounding in the update above
        Wt[b1:].addmm_(U[b0:b1, b1:].t(), Err1, alpha=-1.0)  # lazy update of the later blocks
    return Sweep(Wt.t().contiguous(), keep_t.t().contiguous())
