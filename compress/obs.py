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

RETRIES = 3  # a Hessian that is not positive definite gets its damping raised tenfold, up to this many times


def damped_inverse_cholesky(H: Tensor, damp: float) -> tuple[Tensor, Tensor, float]:
    """Upper Cholesky factor U of (H + λI)⁻¹ (so (H + λI)⁻¹ = UᵀU), λ = damp · mean(diag H).

    Dead inputs (H_jj = 0: a column that never saw a non-zero input) get H_jj = 1 so H stays
    invertible; their weights cannot affect the output. If H + λI is still not positive definite
    in floating point (few calibration tokens for a wide layer, with a small damp), the damping
    is raised tenfold, up to RETRIES times. Returns (U, dead, the damp used) with dead a bool [in]
    mask.
    """
    if not torch.isfinite(H).all():  # no damping fixes NaN or inf: say so rather than retry
        raise ValueError("the calibration Hessian has NaN or inf entries: the layer's inputs overflowed "
                         "(in float16: try --dtype bfloat16 or float32)")
    H = H.clone()  # damped in place below: with L and H⁻¹, three [in, in] at most (memory)
    diag = H.diagonal()
    dead = diag == 0
    diag[dead] = 1.0
    mean_diag = diag.mean()
    undamped = diag.clone()
    for attempt in range(RETRIES + 1):
        used = damp * 10**attempt
        diag.copy_(undamped + used * mean_diag)
        L, info = torch.linalg.cholesky_ex(H)
        if info == 0:
            Hinv = torch.cholesky_inverse(L)
            del L
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if info == 0:
                return U, dead, used
    raise ValueError(f"the calibration Hessian is not positive definite even with damp {used:g} "
                     f"({10**RETRIES}x the recipe's {damp:g}); give more calibration samples or raise damp")


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
    keep: Tensor | None  # [out, in] bool, the mask that was applied (None: no mask)
    damp: float  # the damping used: the one asked for, or more where H needed it


ChooseKeep = Callable[[Tensor, Tensor, int], Tensor]  # (W_blk, diag(Hinv_blk), first column) -> keep_blk
Project = Callable[[int, Tensor, Tensor, Tensor | None], Tensor]  # (position, column, rest, keep_rest) -> q


def obs_sweep(
    W: Tensor,
    H: Tensor,
    *,
    choose_keep: ChooseKeep | None = None,
    keep: Tensor | None = None,
    project: Project | None = None,
    perm: Tensor | None = None,
    block_size: int = 128,
    mask_every: int | None = None,
    damp: float = 0.01,
) -> Sweep:
    """OBS column sweep (SparseGPT, Frantar & Alistarh 2023, Alg. 1; GPTQ, Frantar et al. 2023, Alg. 1).

    Columns are visited in order (or in the order `perm` gives). Column by column:
        q_j   = project(w_j · keep_j)                 (the compressed column)
        err_j = (w_j − q_j) / [H⁻¹]_jj
        W[:, j:] −= err_j · [H⁻¹]_j,j:                (so column j becomes q_j exactly)
    and the block's errors are pushed onto the later blocks in one matmul (lazy batch update).
    The mask is fixed (`keep`) or chosen every `mask_every` columns (default: once per block of
    `block_size`; M for N:M) by `choose_keep` from the weights as they stand after the updates so
    far and the inverse-Hessian diagonal (SparseGPT's adaptive mask). `project(pos, q, rest,
    keep_rest)` rounds the masked column q at position `pos` of the sweep order; rest [n, out]
    holds the updated columns pos, pos+1, ... of the current block, so that a quantizer can pick
    a group's grid at its first column. H⁻¹ enters through its upper Cholesky factor U, whose
    rows give the needed [H⁻¹]_j,j:
    up to a per-row scale (GPTQ's reformulation), which is numerically stable.

    Args:
        W: [out, in] weights (not modified). H: [in, in] Hessian, 2XᵀX/n. perm: [in] visiting order.
    Returns:
        Sweep with the updated weights, in the original column order, and the mask applied.
    """
    if perm is not None:
        H = H[perm][:, perm]
    U, dead, damp = damped_inverse_cholesky(H.float().to(W.device), damp)
    Wt = W.detach().float().t()[perm if perm is not None else slice(None)].contiguous()  # [in, out]
    Wt[dead] = 0.0
    cols = Wt.shape[0]
    masked = keep is not None or choose_keep is not None
    if keep is not None:
        keep_t = keep.t()[perm if perm is not None else slice(None)].contiguous()
    elif choose_keep is not None:
        keep_t = torch.ones_like(Wt, dtype=torch.bool)
    every = mask_every or block_size
    for b0 in range(0, cols, block_size):
        b1 = min(b0 + block_size, cols)
        W1, U1 = Wt[b0:b1], U[b0:b1, b0:b1]  # views: updates land in Wt
        keep1 = keep_t[b0:b1] if masked else None
        d1 = U1.diagonal().square()  # [H⁻¹]_jj of the columns still to come, at each step
        Err1 = torch.empty_like(W1)
        with _single_thread():  # the column updates are too small to split across threads
            for j in range(b1 - b0):
                if choose_keep is not None and j % every == 0:
                    e = min(j + every, b1 - b0)
                    keep1[j:e] = choose_keep(W1[j:e].t(), d1[j:e], b0 + j).t()
                w = W1[j]
                q = w * keep1[j] if masked else w
                if project is not None:
                    q = project(b0 + j, q, W1[j:], keep1[j:] if masked else None)
                err = Err1[j]
                torch.sub(w, q, out=err).div_(U1[j, j])  # (w − q) / [H⁻¹]_jj
                W1[j:].addr_(U1[j, j:], err, alpha=-1.0)  # so column j becomes q
                w.copy_(q)  # exactly q, free of rounding in the update above
        Wt[b1:].addmm_(U[b0:b1, b1:].t(), Err1, alpha=-1.0)  # lazy update of the later blocks
    if perm is not None:
        inv = torch.argsort(perm)
        Wt = Wt[inv]
        keep_t = keep_t[inv] if masked else None
    return Sweep(Wt.t().contiguous(), keep_t.t().contiguous() if masked else None, damp)
