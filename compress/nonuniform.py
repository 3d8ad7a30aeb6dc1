"""LeanQuant: a loss-error-aware non-uniform grid for the GPTQ sweep (Zhang & Shrivastava, ICLR 2025).

GPTQ rounds each column to a min-max uniform grid. Its loss increase from rounding w_j is
(w_j − q_j)² / [H⁻¹]_jj, so the inputs with a small inverse-Hessian diagonal ("inverse-Hessian
outliers") cost most per unit of rounding error, yet the min-max grid ignores them. LeanQuant
places the grid points by a k-means of each row's weights in which input j weighs
[H⁻¹]_jj^(−p/2), p the strength (LeanQuant's `--exponent`, 3 or 4; its reference code raises the
diagonal of the Cholesky factor U of H⁻¹ to −p, and U_jj² = [H⁻¹]_jj as the sweep sees it). The
OBS sweep then assigns each weight, after the error feedback, to its nearest grid point.

Stored layout (layers.LutLinear): codes in the pack layout (compress.pack) indexing a per-row
lookup table, weight_lut float16 [out, n_groups, 2^bits] (n_groups = 1 here):

    Ŵ[o, j] = lut[o, j // group_size, q[o, j]]
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .obs import damped_inverse_cholesky, obs_sweep
from .pack import lut_dequantize


@dataclass
class LutQuantized:
    """Codes of a matrix and the per-group tables they index."""

    codes: Tensor  # uint8 [out, in]
    lut: Tensor  # fp32 [out, n_groups, 2^bits], float16-representable
    bits: int
    group_size: int = -1
    damp: float | None = None  # the Hessian damping used (more than asked where H needed it)

    @property
    def weight(self) -> Tensor:
        return lut_dequantize(self.codes, self.lut, self.group_size)

    @property
    def avg_bits(self) -> float:
        """Stored bits per weight: the codes and a float16 table of 2^bits values per group."""
        out, groups, levels = self.lut.shape
        return self.bits + groups * levels * 16 / self.codes.shape[1]


def nearest_level(w: Tensor, levels: Tensor) -> Tensor:
    """Index of the nearest of the ascending `levels` [rows, K] for each w [rows, n] (int64)."""
    mid = (levels[:, 1:] + levels[:, :-1]) / 2
    return torch.searchsorted(mid.contiguous(), w.contiguous())


def weighted_kmeans(W: Tensor, weight: Tensor, k: int, iters: int = 100) -> Tensor:
    """Lloyd's k-means of each row of W [rows, n] into k levels, value j counting weight[j] ([n] or
    [rows, n]). Levels start evenly spaced between the row's min and max (LeanQuant's uniform
    initialization) and stay ascending; a level that wins no value keeps its place. Stops when no
    assignment changes (or after `iters` rounds). Returns [rows, k].

    In one dimension the clusters are runs of the sorted values, so each round only finds k − 1
    boundaries by binary search and reads the clusters' weighted sums off prefix sums: O(k log n)
    per row instead of O(n).
    """
    Ws, order = W.float().sort(1)
    ws = weight.float().expand_as(W).gather(1, order).double()
    pad = torch.zeros(W.shape[0], 1, dtype=torch.float64, device=W.device)
    cum_w, cum_ww = torch.cat([pad, ws.cumsum(1)], 1), torch.cat([pad, (ws * Ws).cumsum(1)], 1)  # [rows, n + 1]
    C = Ws[:, :1] + (Ws[:, -1:] - Ws[:, :1]) * torch.linspace(0, 1, k, device=W.device)
    first = torch.zeros_like(pad, dtype=torch.long)
    last = torch.full_like(first, W.shape[1])
    bounds = None
    for _ in range(iters):
        # value w joins the level i with mid[i-1] < w <= mid[i], as nearest_level assigns it
        new = torch.searchsorted(Ws, ((C[:, 1:] + C[:, :-1]) / 2).contiguous(), right=True)  # [rows, k − 1]
        if bounds is not None and torch.equal(new, bounds):
            break
        bounds = new
        edges = torch.cat([first, bounds, last], 1)  # cluster i holds sorted values edges[i] .. edges[i+1] − 1
        sw = cum_w.gather(1, edges[:, 1:]) - cum_w.gather(1, edges[:, :-1])
        sww = cum_ww.gather(1, edges[:, 1:]) - cum_ww.gather(1, edges[:, :-1])
        C = torch.where(sw > 0, sww / sw.clamp(min=1e-300), C.double()).float().sort(1).values
    return C


def loss_aware_grid(W: Tensor, U_diag: Tensor, bits: int, p: float, keep: Tensor | None = None) -> Tensor:
    """LeanQuant's grid for each row of W [out, in]: 2^bits float16-representable levels [out, 2^bits]
    from a k-means weighted by U_jj^(−p) (U_diag [in], zero for dead inputs: they do not count).
    With `keep` (pruned zeros to preserve), pruned weights do not count and, in the rows that have
    any, the level nearest 0 becomes exactly 0."""
    alive = U_diag > 0
    logw = (-p * U_diag.double().clamp(min=1e-30).log()).masked_fill(~alive, -torch.inf)
    weight = (logw - logw.max()).exp().float() if alive.any() else torch.ones_like(U_diag)  # max 1: no overflow
    weight = weight.expand_as(W) if keep is None else weight * keep
    C = weighted_kmeans(W, weight, 2**bits).half().float()  # stored in float16: optimize what is stored
    if keep is not None:
        near0, pruned = C.abs().argmin(1, keepdim=True), ~keep.all(1, keepdim=True)
        C.scatter_(1, near0, C.gather(1, near0).masked_fill(pruned, 0.0))
        C = C.sort(1).values
    return C


def leanquant(
    W: Tensor,
    H: Tensor,
    bits: int,
    *,
    p: float = 4.0,
    keep: Tensor | None = None,
    act_order: bool = False,
    block_size: int = 128,
    damp: float = 0.01,
) -> LutQuantized:
    """LeanQuant's non-uniform variant: one loss-error-aware grid per row of W [out, in], learned
    from the weights before the sweep, then the OBS sweep (obs.py) rounding each updated column
    to its row's nearest level. `act_order` visits inputs by decreasing H_jj (the U_jj weights are
    those of that order). `keep` [out, in] bool: weights that must become 0."""
    out, cols = W.shape
    W = W.float() if keep is None else W.float() * keep
    order = torch.argsort(H.diagonal(), descending=True, stable=True) if act_order else None
    Hp = H if order is None else H[order][:, order]
    U, dead, used = damped_inverse_cholesky(Hp.float().to(W.device), damp)
    U_diag = torch.empty(cols, device=W.device)
    U_diag[order if order is not None else slice(None)] = U.diagonal().masked_fill(dead, 0.0)
    C = loss_aware_grid(W, U_diag, bits, p, keep)  # [out, 2^bits]
    columns = order.tolist() if order is not None else range(cols)
    codes_t = torch.empty(cols, out, dtype=torch.uint8, device=W.device)

    def project(pos: int, q: Tensor, rest: Tensor, keep_rest: Tensor | None) -> Tensor:
        c = nearest_level(q[:, None], C)
        codes_t[columns[pos]] = c[:, 0]
        return C.gather(1, c)[:, 0]

    sweep = obs_sweep(W, H, keep=keep, project=project, perm=order, block_size=block_size, damp=used)
    return LutQuantized(codes_t.t().contiguous(), C[:, None, :].contiguous(), bits, -1, sweep.damp)
