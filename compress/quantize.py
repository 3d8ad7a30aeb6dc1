"""The quantizers' configs (Rtn, Awq, Gptq, LeanQuant; hqq.py holds Hqq), each with the
quantize_weight that runs it and its add-ons (densesparse.py, outliers.py, guided.py);
quantize_linear, which applies one to a Linear; and AWQ's scale search and smoothing. The grid is
grid.py's, GPTQ gptq.py's, LeanQuant's nonuniform.py's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from .config import DenseAndSparse, Guided, Outliers, Quantize, require
from .densesparse import DenseSparseQuantized, dense_and_sparse, sparse_count
from .gptq import gptq
from .grid import Quantized, QuantSpec, rtn
from .guided import solve
from .model import match, set_weight_matrix_, weight_matrix
from .nonuniform import LutQuantized, leanquant
from .outliers import outlier_count, owq
from .prune import relative_error
from .stats import FisherStats, LinearStats, all_reduce_stats_


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


def _hessian(stats: LinearStats, method: str) -> Tensor:
    if stats.xtx_upper is None or stats.n_tokens == 0:
        raise ValueError(f"{method} needs calibration inputs, but this Linear received none")
    return stats.hessian


def _guided(step: Gptq | LeanQuant, fisher: FisherStats | None) -> Tensor | None:
    if step.guided is None:
        return None
    if fisher is None or fisher.guided_sum is None:
        raise ValueError("hessian guided needs the gradient-weighted Hessians of this Linear (collected "
                         "before the streaming pass), but none were given")
    return fisher.guided


def _dense_and_sparse(W: Tensor, spec: QuantSpec, step: Rtn | Gptq, stats: LinearStats, keep: Tensor | None,
                      **sweep) -> DenseSparseQuantized:
    H = stats.hessian if stats.xtx_upper is not None and stats.n_tokens > 0 else None
    if H is None and (step.method == "gptq" or step.sparse.score == "sensitivity"):
        raise ValueError(f"{step.method} with sparse_score {step.sparse.score} needs calibration inputs, "
                         "but this Linear received none")
    return dense_and_sparse(W, spec, sparse_count(W.numel(), step.sparse.fraction), score=step.sparse.score, H=H,
                            method=step.method, keep=keep, **sweep)


def _no_mixing(what: str, **others) -> None:
    """Refuse add-ons `what` cannot combine with (others: YAML name -> whether it is set)."""
    clash = [k for k, on in others.items() if on]
    require(not clash, f"quantize.{what} does not combine with {', '.join(clash)}")


@dataclass(frozen=True)
class Rtn(Quantize):
    """Round to nearest on each group's min-max grid (no calibration data)."""

    sparse: DenseAndSparse | None = None
    method: ClassVar[str] = "rtn"

    @property
    def needs(self) -> set[str]:
        sensitivity = self.sparse is not None and self.sparse.score == "sensitivity"  # reads H_jj
        return super().needs | ({"xtx"} if sensitivity else set())

    def validate(self) -> None:
        super().validate()
        if self.sparse is not None:
            _no_mixing("sparse_fraction (dense-and-sparse)", act_bits=self.act is not None,
                       **{"allocation fisher": self.budget is not None})

    def quantize_weight(self, W: Tensor, spec: QuantSpec, stats: LinearStats, fisher: FisherStats | None,
                        keep: Tensor | None) -> Quantized:
        return rtn(W, spec) if self.sparse is None else _dense_and_sparse(W, spec, self, stats, keep)


@dataclass(frozen=True)
class Awq(Quantize):
    """AWQ (Lin et al. 2024): activation-aware scales searched on `awq_grid` points, folded into the
    preceding norm or Linear before the block's Linears run (awq_smooth_block_), then round to
    nearest."""

    awq_grid: int = 20
    method: ClassVar[str] = "awq"
    # AWQ observes XᵀX in its own pass before the block is quantized (awq_smooth_block_); the
    # quantizing pass only needs Σx² for the error it reports
    reads: ClassVar[frozenset[str]] = frozenset({"x_sq"})

    def validate(self) -> None:
        super().validate()
        require(self.awq_grid >= 1, f"quantize.awq_grid must be >= 1, got {self.awq_grid}")
        require(self.act is None or self.act.smooth != "smoothquant",
                "quantize.smooth smoothquant and method awq both migrate scales into the same ops; use rtn or gptq")

    def quantize_weight(self, W: Tensor, spec: QuantSpec, stats: LinearStats, fisher: FisherStats | None,
                        keep: Tensor | None) -> Quantized:
        return rtn(W, spec)  # the scales were folded in before this block ran


@dataclass(frozen=True)
class Gptq(Quantize):
    """GPTQ (gptq.py): OBS error feedback on XᵀX, damped by `damp`, in blocks of `block_size` columns.
    act_order: inputs visited by decreasing activation energy (groups stay contiguous: static).
    static_groups: every group's grid taken from the weights before the sweep.
    Add-ons: outliers (OWQ), sparse (dense-and-sparse), guided (GuidedQuant Hessians)."""

    act_order: bool = False
    static_groups: bool = False
    block_size: int = 128
    damp: float = 0.01
    outliers: Outliers | None = None
    sparse: DenseAndSparse | None = None
    guided: Guided | None = None
    method: ClassVar[str] = "gptq"
    reads: ClassVar[frozenset[str]] = frozenset({"xtx"})

    def validate(self) -> None:
        super().validate()
        require(self.block_size >= 1, f"quantize.block_size must be >= 1, got {self.block_size}")
        require(self.damp > 0, f"quantize.damp must be > 0, got {self.damp}")
        dynamic = not (self.act_order or self.static_groups) and self.group_size != -1
        require(not dynamic or self.block_size % self.group_size == 0,
                f"quantize.block_size {self.block_size} must be a multiple of group_size {self.group_size} "
                "(or set static_groups: true)")
        if self.outliers is not None:
            _no_mixing("outlier_fraction (OWQ)", act_bits=self.act is not None,
                       **{"hessian guided": self.guided is not None, "allocation fisher": self.budget is not None})
        if self.sparse is not None:
            _no_mixing("sparse_fraction (dense-and-sparse)", outlier_fraction=self.outliers is not None,
                       act_bits=self.act is not None, **{"hessian guided": self.guided is not None,
                                                         "allocation fisher": self.budget is not None})
        if self.guided is not None:
            _no_mixing("hessian guided", lm_head=self.lm_head, **{"allocation fisher": self.budget is not None})

    def quantize_weight(self, W: Tensor, spec: QuantSpec, stats: LinearStats, fisher: FisherStats | None,
                        keep: Tensor | None) -> Quantized:
        sweep = dict(act_order=self.act_order, block_size=self.block_size, damp=self.damp)
        if self.sparse is not None:
            return _dense_and_sparse(W, spec, self, stats, keep, static_groups=self.static_groups, **sweep)
        H = _hessian(stats, "gptq")
        if self.outliers is None and self.guided is None:
            return gptq(W, H, spec, keep=keep, static_groups=self.static_groups, **sweep)
        if self.outliers is not None:
            one = lambda W, H, keep: owq(W, H, spec, outlier_count(W.shape[1], self.outliers.fraction),  # noqa: E731
                                         feedback=self.outliers.feedback, keep=keep, **sweep)
        else:
            one = lambda W, H, keep: gptq(W, H, spec, keep=keep, static_groups=self.static_groups, **sweep)  # noqa: E731
        return solve(W, H, one, keep, _guided(self, fisher))


@dataclass(frozen=True)
class LeanQuant(Quantize):
    """LeanQuant (nonuniform.py): the GPTQ sweep on a non-uniform grid of 2^bits levels per output row
    (group_size -1), from a k-means weighted by U_jj^(−lut_exponent), U the Cholesky factor of H⁻¹;
    stored as codes and a float16 table per row. guided: GuidedQuant Hessians."""

    group_size: int = -1
    act_order: bool = False
    block_size: int = 128
    damp: float = 0.01
    lut_exponent: float = 4.0
    guided: Guided | None = None
    method: ClassVar[str] = "leanquant"
    reads: ClassVar[frozenset[str]] = frozenset({"xtx"})

    def validate(self) -> None:
        super().validate()
        require(self.group_size == -1, f"quantize.method leanquant learns one grid per output row: set group_size -1 "
                f"(a table of 2^bits float16 levels per group of {self.group_size} would cost "
                f"{2 ** self.bits * 16}/{self.group_size} bits per weight)")
        require(self.block_size >= 1, f"quantize.block_size must be >= 1, got {self.block_size}")
        require(self.damp > 0, f"quantize.damp must be > 0, got {self.damp}")
        require(self.lut_exponent >= 0, f"quantize.lut_exponent must be >= 0, got {self.lut_exponent}")
        _no_mixing("method leanquant", act_bits=self.act is not None,
                   **{"allocation fisher": self.budget is not None})
        if self.guided is not None:
            _no_mixing("hessian guided", lm_head=self.lm_head)

    def quantize_weight(self, W: Tensor, spec: QuantSpec, stats: LinearStats, fisher: FisherStats | None,
                        keep: Tensor | None) -> LutQuantized:
        one = lambda W, H, keep: leanquant(W, H, spec.bits, p=self.lut_exponent, keep=keep,  # noqa: E731
                                           act_order=self.act_order, block_size=self.block_size, damp=self.damp)
        return solve(W, _hessian(stats, "leanquant"), one, keep, _guided(self, fisher))


def quantize_linear(linear: nn.Module, step: Quantize, stats: LinearStats, fisher: FisherStats | None = None
                    ) -> tuple[dict, Quantized]:
    """Quantize `linear` as `step` says (its quantize_weight). Its weight becomes the dequantized Ŵ
    at once (so later calibration forwards see it); the codes come back for packing into a
    QuantLinear (or the other modules of layers.quant_module).

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
    qw = step.quantize_weight(W, spec, stats, fisher, keep)
    W_new = qw.weight
    set_weight_matrix_(linear, W_new)
    metrics = {"bits": spec.bits, "group_size": spec.group_size, "error": relative_error(W, W_new, stats),
               "avg_bits": qw.avg_bits}
    if isinstance(qw, DenseSparseQuantized):
        metrics["detached"] = qw.sparse_idx.numel()
    if keep is not None:
        metrics["sparsity"] = (W_new == 0).float().mean().item()
    if qw.damp is not None and qw.damp > getattr(step, "damp", float("inf")):
        metrics["damp"] = qw.damp
    return metrics, qw


@torch.no_grad()
def awq_smooth_block_(block: nn.Module, prefix: str, pairs, inputs, step: Awq) -> dict[str, float]:
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
