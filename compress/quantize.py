"""Weight quantization: the grid (RTN), GPTQ on the shared OBS sweep, and AWQ's scale search.

One convention everywhere (DESIGN.md §3.1):

    q = clamp(round(w / scale) + zero, 0, 2^bits − 1)        ŵ = (q − zero) · scale

with integer zero points, so 0.0 is exact and pruned weights stay zero. Groups of `group_size`
consecutive inputs share a scale and zero; scale and zero are [out, ceil(in / group_size)], and
when in % group_size != 0 the last group is shorter (ragged). group_size -1 means one group per
row. Symmetric grids fix zero at 2^(bits−1), so the codes are compressed-tensors' signed values
shifted by that offset. Scales are rounded to float16, the dtype they are stored in, before any
code is chosen, so the stored model is exactly the one that was optimized.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .model import match, set_weight_matrix_, weight_matrix
from .obs import obs_sweep
from .prune import relative_error
from .recipe import Quantize
from .stats import FisherStats, LinearStats, all_reduce_stats_


@dataclass(frozen=True)
class QuantSpec:
    bits: int = 4
    group_size: int = 128  # -1: one group per output row
    sym: bool = True

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    def group(self, cols: int) -> int:
        """The group length for a matrix with `cols` inputs."""
        return cols if self.group_size == -1 else self.group_size


def expand_groups(t: Tensor, group: int, cols: int) -> Tensor:
    """[out, n_groups] -> [out, cols]: each group's value repeated over its columns."""
    return t.repeat_interleave(group, dim=1)[:, :cols]


def choose_qparams(W: Tensor, spec: QuantSpec) -> tuple[Tensor, Tensor]:
    """Min-max scale and zero for each group of W [out, in] -> (scale, zero), each [out, n_groups] fp32.

    The grid always contains 0 (min ≤ 0 ≤ max), as GPTQ's and llm-compressor's observers do.
    """
    out, cols = W.shape
    g = spec.group(cols)
    pad = -cols % g
    Wg = W.float()
    if pad:  # ragged last group: pad with zeros, which the grid contains anyway
        Wg = torch.nn.functional.pad(Wg, (0, pad))
    Wg = Wg.reshape(out, -1, g)
    lo, hi = Wg.amin(-1).clamp(max=0), Wg.amax(-1).clamp(min=0)
    if spec.sym:
        scale = torch.maximum(-lo, hi) / (spec.maxq / 2)  # [-max, max] over 2^bits − 1 steps
        zero = torch.full_like(scale, 2 ** (spec.bits - 1))
    else:
        scale = (hi - lo) / spec.maxq
    scale = _storable(scale)
    if not spec.sym:
        zero = torch.round(-lo / scale).clamp(0, spec.maxq)
    return scale, zero


def _storable(scale: Tensor) -> Tensor:
    """Round up to float16 (the stored dtype), so the grid still spans the group's range; empty
    groups get scale 1."""
    scale = torch.where(scale > 0, scale, torch.ones_like(scale)).clamp(2**-24, 65504.0)
    s16 = scale.half()
    s16 = torch.where(s16.float() < scale, torch.nextafter(s16, torch.full_like(s16, float("inf"))), s16)
    return s16.float()


def quantize(W: Tensor, scale: Tensor, zero: Tensor, spec: QuantSpec) -> Tensor:
    """Codes uint8 [out, in] of W on the grid (scale, zero) [out, n_groups]."""
    cols = W.shape[1]
    g = spec.group(cols)
    s, z = expand_groups(scale, g, cols), expand_groups(zero, g, cols)
    return (torch.round(W.float() / s) + z).clamp_(0, spec.maxq).to(torch.uint8)


def dequantize(codes: Tensor, scale: Tensor, zero: Tensor, group_size: int) -> Tensor:
    """ŵ = (q − zero) · scale, fp32 [out, in]; group_size -1 means one group per row."""
    cols = codes.shape[1]
    g = cols if group_size == -1 else group_size
    s, z = expand_groups(scale.float(), g, cols), expand_groups(zero.float(), g, cols)
    return (codes.float() - z) * s


@dataclass
class Quantized:
    """The result of quantizing one weight matrix."""

    codes: Tensor  # uint8 [out, in]
    scale: Tensor  # fp32 [out, n_groups], float16-representable
    zero: Tensor  # fp32 [out, n_groups], integers
    spec: QuantSpec
    damp: float | None = None  # GPTQ: the Hessian damping used (more than asked where H needed it)

    @property
    def weight(self) -> Tensor:
        return dequantize(self.codes, self.scale, self.zero, self.spec.group_size)

    @property
    def avg_bits(self) -> float:
        """Stored bits per weight: the codes, a float16 scale per group and, when asymmetric, a
        zero point of `bits` bits per group (compressed-tensors packs them)."""
        groups, cols = self.scale.shape[1], self.codes.shape[1]
        return self.spec.bits + groups * (16 + (0 if self.spec.sym else self.spec.bits)) / cols


def rtn(W: Tensor, spec: QuantSpec) -> Quantized:
    """Round to nearest on the min-max grid of each group."""
    scale, zero = choose_qparams(W, spec)
    return Quantized(quantize(W, scale, zero, spec), scale, zero, spec)


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
    returned weights hold those values there.
    """
    out, cols = W.shape
    g = spec.group(cols)
    W = W.float() if keep is None else W.float() * keep
    static = static_groups or act_order or g >= cols
    if not static and block_size % g:
        raise ValueError(f"block_size {block_size} must be a multiple of group_size {g} (or use static groups)")
    if static:
        scale, zero = choose_qparams(W if detached is None else W.masked_fill(detached, 0.0), spec)
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


def awq_scales(W: Tensor, xtx: Tensor, x_mag: Tensor, spec: QuantSpec, grid: int = 20) -> tuple[Tensor, float]:
    """AWQ's activation-aware scale search (Lin et al. 2024, §3.2) for the Linears that share one
    input: W [out, in] is their weights stacked, xtx [in, in] = Σ x xᵀ, x_mag [in] the mean input
    magnitude per channel.

    For α on a grid in [0, 1), s = x_mag^α (normalized), the weights W·diag(s) are rounded and the
    output error ‖(W − Q(W·s)/s) X‖² is read off XᵀX exactly (no forward passes needed). Returns
    the best s [in] and its α.
    """
    best, best_err, best_alpha = torch.ones_like(x_mag), float("inf"), 0.0
    mag = x_mag.clamp(min=1e-8)
    for i in range(grid):
        alpha = i / grid
        s = mag.pow(alpha)
        s = s / (s.max() * s.min()).sqrt()
        D = W - rtn(W * s, spec).weight / s
        err = ((D @ xtx) * D).sum().item()
        if err < best_err:
            best, best_err, best_alpha = s, err, alpha
    return best, best_alpha


def quantize_linear(linear: nn.Module, step: Quantize, stats: LinearStats, fisher: FisherStats | None = None
                    ) -> tuple[dict, Quantized]:
    """Quantize `linear` as `step` says. Its weight becomes the dequantized Ŵ at once (so later
    calibration forwards see it); the codes come back for packing into a QuantLinear (or, for
    OWQ and LeanQuant, the modules of layers.quant_module).

    Zeros already in the weight (an earlier prune step) are kept exactly. `fisher` carries the
    gradient-weighted Hessians of a GuidedQuant step (hessian: guided).
    """
    W = weight_matrix(linear).detach().float().clone()  # [out, in]
    spec = QuantSpec(step.bits, step.group_size, step.sym)
    if step.group_size != -1 and step.group_size > W.shape[1]:
        # only low-rank factors and structurally narrowed Linears get here (apply.check_shapes refuses
        # the recipe's own targets up front): one group covers the row
        spec = QuantSpec(step.bits, -1, step.sym)
    zeros = W == 0
    keep = ~zeros if zeros.any() else None
    if step.sparse_fraction > 0:
        from .densesparse import dense_and_sparse, sparse_count  # densesparse.py imports this module

        H = stats.hessian if stats.xtx_upper is not None and stats.n_tokens > 0 else None
        if H is None and (step.method == "gptq" or step.sparse_score == "sensitivity"):
            raise ValueError(f"{step.method} with sparse_score {step.sparse_score} needs calibration inputs, "
                             "but this Linear received none")
        qw = dense_and_sparse(W, spec, sparse_count(W.numel(), step.sparse_fraction), score=step.sparse_score, H=H,
                              method=step.method, keep=keep, act_order=step.act_order,
                              static_groups=step.static_groups, block_size=step.block_size, damp=step.damp)
    elif step.method == "leanquant" or step.outlier_fraction > 0 or step.hessian == "guided":
        from .guided import solve  # OWQ, LeanQuant, GuidedQuant (guided.py imports this module)

        if stats.xtx_upper is None or stats.n_tokens == 0:
            raise ValueError(f"{step.method} needs calibration inputs, but this Linear received none")
        if step.hessian == "guided" and (fisher is None or fisher.guided_sum is None):
            raise ValueError("hessian guided needs the gradient-weighted Hessians of this Linear (collected "
                             "before the streaming pass), but none were given")
        qw = solve(W, stats.hessian, spec, step, keep, fisher.guided if step.hessian == "guided" else None)
    elif step.method == "gptq":
        if stats.xtx_upper is None or stats.n_tokens == 0:
            raise ValueError("gptq needs calibration inputs, but this Linear received none")
        qw = gptq(W, stats.hessian, spec, keep=keep, act_order=step.act_order,
                  static_groups=step.static_groups, block_size=step.block_size, damp=step.damp)
    else:  # rtn, and awq whose scales were folded in before this block ran (awq_smooth_block_)
        qw = rtn(W, spec)
    W_new = qw.weight
    set_weight_matrix_(linear, W_new)
    metrics = {"bits": spec.bits, "group_size": spec.group_size, "error": relative_error(W, W_new, stats),
               "avg_bits": qw.avg_bits}
    if step.sparse_fraction > 0:
        metrics["detached"] = qw.sparse_idx.numel()
    if keep is not None:
        metrics["sparsity"] = (W_new == 0).float().mean().item()
    if qw.damp is not None and qw.damp > step.damp:
        metrics["damp"] = qw.damp
    return metrics, qw


@torch.no_grad()
def awq_smooth_block_(block: nn.Module, prefix: str, pairs, inputs, step: Quantize) -> dict[str, float]:
    """AWQ's smoothing for one decoder block, in place: for each (previous op, Linears) pair of the
    architecture table, search the per-channel scale s on the block's calibration inputs, divide
    the previous op's output channels by s and multiply the Linears' input columns by s (the
    block computes the same function). Returns the chosen α per pair.

    Pairs whose previous op's width differs from the Linears' input width (v_proj → o_proj under
    grouped-query attention) are skipped, as in AutoAWQ.
    """
    from .calibrate import observe, run_block_

    spec = QuantSpec(step.bits, step.group_size, step.sym)
    found = []
    for prev_name, names in pairs:
        linears = {n: block.get_submodule(n) for n in names if _has(block, n)}
        if not _has(block, prev_name) or not linears:
            continue
        if not all(match(f"{prefix}.{n}", step.targets, step.ignore) for n in linears):
            continue
        prev = block.get_submodule(prev_name)
        width = weight_matrix(prev).shape[0] if prev.weight.dim() == 2 else prev.weight.shape[0]
        if any(weight_matrix(m).shape[1] != width for m in linears.values()):
            continue
        found.append((prev, linears))
    if not found:
        return {}
    watched = {f"{i}.{n}": m for i, (_, ls) in enumerate(found) for n, m in ls.items()}
    with observe(watched, {"xtx"}) as stats:
        run_block_(block, inputs)
    all_reduce_stats_(stats.values())  # the search reads the error off XᵀX alone: summing it suffices
    alphas = {}
    for i, (prev, linears) in enumerate(found):
        st = stats[f"{i}.{next(iter(linears))}"]
        W = torch.cat([weight_matrix(m).float() for m in linears.values()])
        xtx = st.xtx / max(st.n_tokens, 1)
        x_rms = xtx.diagonal().clamp(min=0).sqrt()  # per-channel input magnitude
        s, alphas[",".join(linears)] = awq_scales(W, xtx, x_rms, spec, step.awq_grid)
        _scale_outputs_(prev, 1.0 / s)
        for m in linears.values():
            set_weight_matrix_(m, weight_matrix(m).float() * s)
    return alphas


def _has(block: nn.Module, name: str) -> bool:
    try:
        block.get_submodule(name)
        return True
    except AttributeError:
        return False


def _scale_outputs_(module: nn.Module, factor: Tensor) -> None:
    """Multiply the output channels of a norm or Linear by factor [channels]."""
    if module.weight.dim() == 2:
        set_weight_matrix_(module, weight_matrix(module).float() * factor[:, None])
    else:
        module.weight.mul_(factor.to(module.weight.dtype))
    if getattr(module, "bias", None) is not None:
        module.bias.mul_(factor.to(module.bias.dtype))
