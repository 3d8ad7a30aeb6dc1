"""GPTQ (Frantar et al. 2023): rounding onto the grid (grid.py) column by column on the shared OBS
sweep (obs.py), the rounding error pushed onto the columns not yet quantized."""

from __future__ import annotations

import torch
from torch import Tensor

from .grid import Quantized, QuantSpec, choose_qparams, expand_groups
from .obs import obs_sweep


def gptq(W: Tensor, H: Tensor, spec: QuantSpec, **options) -> Quantized:
    """GPTQ's quantized weights alone: gptq_sweep(W, H, spec, **options)[0]."""
    return gptq_sweep(W, H, spec, **options)[0]


def gptq_sweep(
    W: Tensor,
    H: Tensor,
    spec: QuantSpec,
    *,
    keep: Tensor | None = None,
    act_order: bool = False,
    static_groups: bool = False,
    block_size: int = 128,
    damp: float = 0.01,
    detached: Tensor | None = None,
    grid: str = "minmax",
) -> tuple[Quantized, Tensor]:
    """GPTQ (Frantar et al. 2023, Alg. 1): quantize the columns of W [out, in] one by one, left to
    right, each on its group's grid, and push the rounding error onto the later columns through
    H⁻¹ (the shared OBS sweep of obs.py). Returns the quantized weights and the weights the sweep
    left (fp32 [out, in]).

    A group's grid is chosen when the sweep reaches its first column, from the weights as updated
    so far; with `static_groups` all grids come from the original weights up front. `act_order`
    visits columns by decreasing H_jj (the most active inputs first) and implies static groups,
    so groups stay contiguous in the stored order and no g_idx is needed (llm-compressor's
    "static"/"weight" act-order, the form compressed-tensors loads). `keep` [out, in] bool: weights
    that must become exactly 0 (an earlier prune step's mask). `detached` [out, in] bool:
    weights kept out of the grid (dense-and-sparse, densesparse.py): they count as 0 when a grid
    is chosen, their codes sit at the zero point, and the sweep does not round them but keeps
    their current value in float16, so they feed back nothing but that float16 rounding; the
    returned weights hold those values there. `grid`: how each group's grid is chosen
    (grid.choose_qparams); "kl" (KL pre-calibration) implies static groups, since it is a step
    before the sweep, on the original weights.
    """
    out, cols = W.shape
    g = spec.group(cols)
    W = W.float() if keep is None else W.float() * keep
    static = static_groups or act_order or g >= cols or grid != "minmax"
    if not static and block_size % g:
        raise ValueError(f"block_size {block_size} must be a multiple of group_size {g} (or use static groups)")
    if static:
        scale, zero = choose_qparams(W if detached is None else W.masked_fill(detached, 0.0), spec, grid)
    else:
        scale, zero = W.new_empty(out, -(-cols // g)), W.new_empty(out, -(-cols // g))
    # per column, transposed so that column col is the contiguous row [col]
    s_col, z_col = expand_groups(scale, g, cols).t().contiguous(), expand_groups(zero, g, cols).t().contiguous()
    order = torch.argsort(H.diagonal(), descending=True, stable=True) if act_order else None
    columns = order.tolist() if order is not None else range(cols)
    codes_t = torch.empty(cols, out, dtype=torch.uint8, device=W.device)
    per_row = QuantSpec(spec.bits, -1, spec.sym)
    detached_t = None if detached is None else detached.t()  # [in, out]

    def project(pos: int, q: Tensor, rest: Tensor, keep_rest: Tensor | None) -> Tensor:
        col = columns[pos]
        if not static and col % g == 0:  # a group starts: its grid from the weights as they are now
            Wg = rest[: min(g, cols - col)].t()
            Wg = Wg if keep_rest is None else Wg * keep_rest[: Wg.shape[1]].t()
            if detached_t is not None:
                Wg = Wg.masked_fill(detached_t[col : col + Wg.shape[1]].t(), 0.0)
            sg, zg = choose_qparams(Wg, per_row)
            scale[:, col // g], zero[:, col // g] = sg[:, 0], zg[:, 0]
            s_col[col : col + g], z_col[col : col + g] = sg[:, 0], zg[:, 0]
        s, z = s_col[col], z_col[col]
        c = torch.round(q / s).add_(z).clamp_(0, spec.maxq)
        if detached_t is None:
            codes_t[col] = c
            return c.sub_(z).mul_(s)
        d = detached_t[col]
        codes_t[col] = torch.where(d, z, c)
        return torch.where(d, q.half().float(), (c - z) * s)

    sweep = obs_sweep(W, H, keep=keep, project=project, perm=order, block_size=block_size, damp=damp)
    return Quantized(codes_t.t().contiguous(), scale, zero, spec, sweep.damp), sweep.W
