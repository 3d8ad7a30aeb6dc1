"""Reference equivalence (issue 18): our one OBS sweep (obs.obs_sweep) against the papers' Algorithm 1.

The references below are SparseGPT's and GPTQ's pseudo-code written out plainly in float64, line
by line (the "l. N" comments number the lines of each paper's Algorithm 1):

  SparseGPT: Frantar & Alistarh, "SparseGPT: Massive Language Models Can Be Accurately Pruned in
             One-Shot", ICML 2023, Algorithm 1 (and §3.3 for n:m).
  GPTQ:      Frantar, Ashkboos, Hoefler & Alistarh, "GPTQ: Accurate Post-Training Quantization for
             Generative Pre-trained Transformers", ICLR 2023, Algorithm 1.

They are run on the same Hessian our code gets (LinearStats.hessian, 2XᵀX/n) and compared with the
public paths the recipes use: prune.prune_linear and quantize.quantize_linear. Conventions the
papers leave open are matched to ours and said so where they are written: the damping
λ = damp · mean(diag H), dead inputs (H_jj = 0) get H_jj = 1 and a zero weight (as in the authors'
code), the grid q = clamp(round(w / scale) + zero, 0, 2^bits − 1) with scales rounded up to the
nearest float16 before any code is chosen.

Where our code and the papers differ, the tests below show the difference (README, "Our SparseGPT
and GPTQ against the papers").
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from compress import Gptq, SparseGpt
from compress.model import weight_matrix
from compress.prune import prune_linear
from compress.quantize import quantize_linear
from compress.stats import LinearStats

F64 = torch.float64

# Our sweep runs in float32, the references in float64. On these problems (cond(H + λI) ≈ 450,
# at most 96 columns of updates, |W| ≲ 4) the float32 rounding of the sweep moves a pruned-and-
# updated weight by at most 3.2e-6 (measured); 3e-5 absolute leaves ten times that, and is far
# below what the OBS update itself changes (≈ 1 here) or a different mask would. Masks, grids and
# codes are compared exactly: a code would differ only if float32 put w / scale on the other side
# of a rounding boundary, which these fixed seeds do not.
ATOL = 3e-5


# ---------------------------------------------------------------- the papers, in float64


def inverse_hessian_factor(H: Tensor, damp: float) -> tuple[Tensor, Tensor]:
    """H⁻¹ ← Cholesky(H⁻¹)ᵀ (l. 3 of both algorithms): the upper Cholesky factor of (H + λI)⁻¹.

    Our conventions, as in the authors' code: a dead input (H_jj = 0) gets H_jj = 1, then
    λ = damp · mean(diag H). Returns (the factor, the dead inputs).
    """
    H = H.to(F64).clone()
    dead = H.diagonal() == 0
    H[dead, dead] = 1.0
    H += damp * H.diagonal().mean() * torch.eye(len(H), dtype=F64)
    return torch.linalg.cholesky(torch.linalg.inv(H)).T, dead


def sparsegpt_reference(W: Tensor, H: Tensor, p: float, B: int, damp: float,
                        n_m: tuple[int, int] | None = None, per_row: bool = False) -> tuple[Tensor, Tensor]:
    """SparseGPT, Alg. 1: prune W [d_row, d_col] to sparsity p; returns (pruned W, keep mask M).

    Unstructured: the mask is chosen every B_s = B columns (our sweep ties B_s to the block size),
    over the whole block W[:, j:j+B_s] (all rows together: "each B_s consecutive columns will be
    p% sparse"). n:m (§3.3): B_s = m, and per row the m − n lowest scores of each group of m are
    pruned (n of every m are kept; for 2:4 both readings of "n:m" coincide). per_row is not the
    paper: the same count per row in every block, our `scope: row`.
    """
    W, (d_row, d_col) = W.to(F64).clone(), W.shape
    Hinv, dead = inverse_hessian_factor(H, damp)
    W[:, dead] = 0.0
    Bs = n_m[1] if n_m else B
    M = torch.ones(d_row, d_col, dtype=torch.bool)  # l. 1
    for i in range(0, d_col, B):  # l. 4
        i2 = min(i + B, d_col)
        E = torch.zeros(d_row, i2 - i, dtype=F64)  # l. 2
        for j in range(i, i2):  # l. 5
            if j % Bs == 0:  # l. 6-7: keep the (1 − p) of W[:, j:j+Bs] with the largest w²/[H⁻¹]_cc²
                cols = slice(j, min(j + Bs, d_col))
                M[:, cols] = _keep_largest(W[:, cols] ** 2 / Hinv.diagonal()[cols] ** 2, p, n_m, per_row)
            E[:, j - i] = W[:, j] / Hinv[j, j]  # l. 9: pruning error
            E[:, j - i] *= ~M[:, j]  # l. 10: nothing for the weights kept
            W[:, j:i2] -= torch.outer(E[:, j - i], Hinv[j, j:i2])  # l. 11: OBS update
        W[:, i2:] -= E @ Hinv[i:i2, i2:]  # l. 13: lazy batch update
    return W * M, M  # l. 15


def _keep_largest(score: Tensor, p: float, n_m: tuple[int, int] | None, per_row: bool) -> Tensor:
    rows, cols = score.shape
    if n_m is not None:  # per row, the n largest of each group of m
        n, m = n_m
        top = score.reshape(rows, cols // m, m).topk(n, dim=-1).indices
        return torch.zeros(rows, cols // m, m, dtype=torch.bool).scatter_(-1, top, True).reshape(rows, cols)
    flat = score.reshape(rows, -1) if per_row else score.reshape(1, -1)
    drop = round(p * flat.shape[1])  # p · (rows · B_s) is an integer in every case tested
    low = flat.topk(drop, dim=1, largest=False).indices
    return torch.ones_like(flat, dtype=torch.bool).scatter_(1, low, False).reshape(rows, cols)


def grid(Wg: Tensor, bits: int, sym: bool) -> tuple[Tensor, Tensor]:
    """Min-max grid (scale, zero) [rows] of one group Wg [rows, g], always containing 0.

    The scale is rounded up to the nearest float16 (the stored dtype; ours, not the papers') before
    the zero point and the codes are chosen from it.
    """
    maxq = 2**bits - 1
    lo, hi = Wg.amin(1).clamp(max=0), Wg.amax(1).clamp(min=0)
    scale = torch.maximum(-lo, hi) / (maxq / 2) if sym else (hi - lo) / maxq
    scale = torch.where(scale > 0, scale, 1.0).clamp(2**-24, 65504.0)
    half = scale.half()  # the nearest float16, then up one step if that was below
    half = torch.where(half.to(F64) < scale, torch.nextafter(half, torch.full_like(half, float("inf"))), half)
    scale = half.to(F64)
    zero = torch.full_like(scale, 2 ** (bits - 1)) if sym else torch.round(-lo / scale).clamp(0, maxq)
    return scale, zero


def gptq_reference(W: Tensor, H: Tensor, bits: int, G: int, B: int, damp: float, *, sym: bool = True,
                   act_order: bool = False, grids: str = "static") -> tuple[Tensor, Tensor, Tensor]:
    """GPTQ, Alg. 1, with groups of G columns; returns (codes, scale, zero) in the original column order.

    grids: "static", every group's grid from the original W before the sweep (the authors' code's
    static_groups); "current", a group's grid when the sweep reaches its first column, from the
    weights as they stand then; "block_start", the same but from the weights as they stood at the
    start of the current block of B columns (the authors' code: its W[:, j:j+G] has had the lazy
    updates only). act_order: columns visited by decreasing diag(H), static grids only.
    """
    W, (d_row, d_col) = W.to(F64).clone(), W.shape
    n_groups = -(-d_col // G)
    scale, zero = torch.empty(d_row, n_groups, dtype=F64), torch.empty(d_row, n_groups, dtype=F64)
    if grids == "static":  # from the weights as given (dead inputs included, as ours: see the test below)
        for g0 in range(0, d_col, G):
            scale[:, g0 // G], zero[:, g0 // G] = grid(W[:, g0 : g0 + G], bits, sym)
    perm = torch.argsort(H.diagonal(), descending=True, stable=True) if act_order else torch.arange(d_col)
    W, H = W[:, perm], H[perm][:, perm]
    Hinv, dead = inverse_hessian_factor(H, damp)
    W[:, dead] = 0.0
    maxq = 2**bits - 1
    codes = torch.zeros(d_row, d_col, dtype=F64)  # l. 1 (Q, as codes; Q = (codes − zero) · scale)
    for i in range(0, d_col, B):  # l. 4
        i2 = min(i + B, d_col)
        E = torch.zeros(d_row, i2 - i, dtype=F64)  # l. 2
        W_at_block_start = W.clone()
        for j in range(i, i2):  # l. 5
            c = int(perm[j])  # the column's index in W as given: its group is c // G
            if grids != "static" and c % G == 0:
                source = W if grids == "current" else W_at_block_start
                scale[:, c // G], zero[:, c // G] = grid(source[:, j : min(j + G, d_col)], bits, sym)
            s, z = scale[:, c // G], zero[:, c // G]
            codes[:, j] = (torch.round(W[:, j] / s) + z).clamp(0, maxq)  # l. 6: Q = quant(W[:, j])
            q = (codes[:, j] - z) * s
            E[:, j - i] = (W[:, j] - q) / Hinv[j, j]  # l. 7: quantization error
            W[:, j:i2] -= torch.outer(E[:, j - i], Hinv[j, j:i2])  # l. 8: update the block
        W[:, i2:] -= E @ Hinv[i:i2, i2:]  # l. 10: lazy batch update
    return codes[:, torch.argsort(perm)], scale, zero


# ---------------------------------------------------------------- problems and our public paths


def problem(seed: int, rows: int, cols: int, dead: int | None = None) -> tuple[Tensor, LinearStats]:
    """Random W [rows, cols] and the statistics of 4·cols correlated random inputs (dead: one input always 0)."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g)
    mix = torch.randn(cols, cols, generator=g) / cols**0.5  # correlated inputs
    X = torch.randn(4 * cols, cols, generator=g) @ mix
    if dead is not None:
        X[:, dead] = 0.0
    stats = LinearStats()
    stats.update(X, {"xtx"})
    return W, stats


def linear_of(W: Tensor) -> nn.Linear:
    linear = nn.Linear(W.shape[1], W.shape[0], bias=False)
    with torch.no_grad():
        linear.weight.copy_(W)
    return linear


def ours_prune(W: Tensor, stats: LinearStats, **step) -> Tensor:
    step = SparseGpt(**step)
    step.validate()
    linear = linear_of(W)
    prune_linear(linear, step, stats)
    return weight_matrix(linear).detach()


def ours_quantize(W: Tensor, stats: LinearStats, **step):
    step = Gptq(bits=4, **step)
    step.validate()
    return quantize_linear(linear_of(W), step, stats)[1]


# (seed, rows, cols, block size B, dead input): B < cols everywhere, so the lazy batch updates
# matter; 40 and 48 columns leave a shorter last block.
SHAPES = [(0, 16, 64, 16, None), (1, 16, 64, 32, None), (2, 12, 40, 16, None), (3, 8, 48, 32, 5), (4, 16, 64, 8, 17)]


# ---------------------------------------------------------------- exact where we follow the papers


@pytest.mark.parametrize("seed,rows,cols,B,dead", SHAPES)
def test_sparsegpt_unstructured_scope_layer_is_algorithm_1(seed, rows, cols, B, dead):
    W, stats = problem(seed, rows, cols, dead)
    ours = ours_prune(W, stats, sparsity=0.5, scope="layer", block_size=B)
    ref, keep = sparsegpt_reference(W, stats.hessian, 0.5, B, damp=0.01)
    assert torch.equal(ours != 0, keep)  # the same mask, exactly
    assert (ours == 0).sum() == rows * cols // 2
    torch.testing.assert_close(ours.to(F64), ref, rtol=0, atol=ATOL)


@pytest.mark.parametrize("seed,rows,cols,B,dead", SHAPES)
def test_sparsegpt_2_4_is_algorithm_1_with_masks_every_m_columns(seed, rows, cols, B, dead):
    W, stats = problem(seed, rows, cols, dead)
    ours = ours_prune(W, stats, sparsity=0.5, pattern="2:4", block_size=B)
    ref, keep = sparsegpt_reference(W, stats.hessian, 0.5, B, damp=0.01, n_m=(2, 4))
    assert torch.equal(ours != 0, keep)
    assert ((ours != 0).reshape(rows, -1, 4).sum(-1) == 2).all()
    torch.testing.assert_close(ours.to(F64), ref, rtol=0, atol=ATOL)


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("seed,rows,cols,B,dead", SHAPES)
def test_gptq_w4_static_groups_is_algorithm_1(seed, rows, cols, B, dead, sym, act_order):
    W, stats = problem(seed, rows, cols, dead)
    G = 16  # 40 columns: a ragged last group of 8
    qw = ours_quantize(W, stats, group_size=G, sym=sym, static_groups=True, act_order=act_order, block_size=B)
    codes, scale, zero = gptq_reference(W, stats.hessian, 4, G, B, damp=0.01, sym=sym, act_order=act_order)
    assert torch.equal(qw.scale.to(F64), scale) and torch.equal(qw.zero.to(F64), zero)
    assert torch.equal(qw.codes.to(F64), codes)  # every code, exactly
    # so the dequantized weights are equal too (exactly: small integers times float16 scales)
    assert torch.equal(qw.weight.to(F64), (codes - zero.repeat_interleave(G, 1)[:, :cols])
                       * scale.repeat_interleave(G, 1)[:, :cols])


@pytest.mark.parametrize("seed,rows,cols", [(0, 16, 64), (1, 16, 64), (5, 12, 96)])
def test_gptq_dynamic_groups_read_the_weights_as_updated_so_far(seed, rows, cols):
    """Deviation from the authors' code (Alg. 1 itself has no groups): a group's grid is chosen when
    the sweep reaches its first column, from the weights as they stand then, in-block updates
    included. The authors' code reads them as they stood at the start of the block of B columns.
    The two agree when G = B (a group starts where a block starts: the 128/128 defaults) and differ
    when G < B."""
    W, stats = problem(seed, rows, cols)
    H, G = stats.hessian, 16
    codes_for_B = []
    for B in (16, 32, 64):
        qw = ours_quantize(W, stats, group_size=G, block_size=B)
        codes_for_B.append(qw.codes)
        current = gptq_reference(W, H, 4, G, B, damp=0.01, grids="current")
        block_start = gptq_reference(W, H, 4, G, B, damp=0.01, grids="block_start")
        assert torch.equal(qw.codes.to(F64), current[0]) and torch.equal(qw.scale.to(F64), current[1])
        if B == G:
            assert torch.equal(current[0], block_start[0]) and torch.equal(current[1], block_start[1])
        else:  # later groups of a block get other grids, hence other codes
            assert not torch.equal(qw.scale.to(F64), block_start[1])
            assert not torch.equal(qw.codes.to(F64), block_start[0])
    # ours does not depend on B, as Alg. 1's lazy batching (a reordering of the same updates) should not
    assert torch.equal(codes_for_B[0], codes_for_B[1]) and torch.equal(codes_for_B[0], codes_for_B[2])


@pytest.mark.parametrize("seed,rows,cols,B,dead", SHAPES[:3])
def test_sparsegpt_scope_row_is_not_the_papers_mask(seed, rows, cols, B, dead):
    """Deviation: our default `scope: row` drops the same count in every row of each block; the
    paper's mask compares all rows of the block together (our `scope: layer`, exact above)."""
    W, stats = problem(seed, rows, cols, dead)
    ours = ours_prune(W, stats, sparsity=0.5, block_size=B)  # scope: row, the default
    per_row, keep_row = sparsegpt_reference(W, stats.hessian, 0.5, B, damp=0.01, per_row=True)
    _, keep_paper = sparsegpt_reference(W, stats.hessian, 0.5, B, damp=0.01)
    assert torch.equal(ours != 0, keep_row)  # exactly Alg. 1 with a per-row count in line 7
    torch.testing.assert_close(ours.to(F64), per_row, rtol=0, atol=ATOL)
    assert not torch.equal(keep_row, keep_paper)
    assert ((ours == 0).sum(1) == cols // 2).all()  # every row half sparse; not so in the paper's
    assert not ((~keep_paper).sum(1) == cols // 2).all()


def test_static_grids_count_dead_inputs_unlike_the_authors_code():
    """Deviation from the authors' code, not from the paper (which has no dead inputs): our static
    grids are chosen from W as given, the authors' code zeroes the weights of dead inputs first.
    Only groups holding a dead input differ, and only when its weight is the group's largest."""
    W, stats = problem(0, 8, 32, dead=3)
    W[:, 3] = 10.0  # the largest weight of group 0 in every row; the input never fires
    qw = ours_quantize(W, stats, group_size=16, static_groups=True, block_size=16)
    codes, scale, _ = gptq_reference(W, stats.hessian, 4, 16, 16, damp=0.01)
    assert torch.equal(qw.codes.to(F64), codes) and torch.equal(qw.scale.to(F64), scale)
    W0 = W.clone()
    W0[:, 3] = 0.0  # what the authors' code does before its static grids
    _, scale_theirs, _ = gptq_reference(W0, stats.hessian, 4, 16, 16, damp=0.01)
    assert (qw.scale[:, 0].to(F64) > scale_theirs[:, 0]).all()  # a coarser grid for group 0
    assert torch.equal(qw.scale[:, 1].to(F64), scale_theirs[:, 1])
