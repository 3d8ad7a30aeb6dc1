"""The quantizers' configs (Rtn, Awq, Gptq, LeanQuant; hqq.py holds Hqq), each with the
quantize_weight that runs it and its add-ons (densesparse.py, outliers.py, guided.py);
quantize_linear, which applies one to a Linear (AWQ's scales are smooth.py's). The grid is
grid.py's, GPTQ gptq.py's, LeanQuant's nonuniform.py's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor, nn

from .config import DenseAndSparse, Guided, Outliers, Quantize, require
from .densesparse import DenseSparseQuantized, dense_and_sparse, sparse_count
from .fpquant import FORMATS, STATIC_ACTS, FloatQuantized, act_static_scale, gptq_float, rtn_float
from .gptq import gptq
from .grid import Quantized, QuantSpec, rtn
from .guided import solve
from .model import set_weight_matrix_, weight_matrix
from .nonuniform import LutQuantized, leanquant
from .outliers import outlier_count, owq
from .prune import relative_error
from .stats import FisherStats, LinearStats


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


def _check_grid(step: Rtn | Gptq) -> None:
    """The checks of the `grid` option Rtn and Gptq share."""
    require(step.grid in ("minmax", "kl"), f"quantize.grid must be minmax or kl, got {step.grid!r}")
    if step.grid != "minmax":
        require(step.format == "int", f"quantize.grid {step.grid} chooses integer grids, not format {step.format}'s")
        # these choose their grids (allocation fisher: its bit widths) on min-max grids, elsewhere
        _no_mixing(f"grid {step.grid}", sparse_fraction=step.sparse is not None,
                   outlier_fraction=getattr(step, "outliers", None) is not None,
                   **{"allocation fisher": step.budget is not None})


@dataclass(frozen=True)
class Rtn(Quantize):
    """Round to nearest on each group's grid (no calibration data). grid: "minmax" spans each group's
    range; "kl" is KL pre-calibration (grid.kl_qparams): the range shrunk to the grid whose quantized
    weights' histogram is closest to the original weights' in KL divergence."""

    sparse: DenseAndSparse | None = None
    grid: str = "minmax"
    method: ClassVar[str] = "rtn"

    @property
    def needs(self) -> set[str]:
        sensitivity = self.sparse is not None and self.sparse.score == "sensitivity"  # reads H_jj
        return super().needs | ({"xtx"} if sensitivity else set())

    def validate(self) -> None:
        super().validate()
        _check_grid(self)
        if self.sparse is not None:
            _no_mixing("sparse_fraction (dense-and-sparse)", act_bits=self.act is not None,
                       **{"allocation fisher": self.budget is not None})

    def quantize_weight(self, W: Tensor, spec: QuantSpec, stats: LinearStats, fisher: FisherStats | None,
                        keep: Tensor | None) -> Quantized:
        return rtn(W, spec, self.grid) if self.sparse is None else _dense_and_sparse(W, spec, self, stats, keep)


@dataclass(frozen=True)
class Awq(Quantize):
    """AWQ (Lin et al. 2024): activation-aware scales searched on `awq_grid` points, folded into the
    preceding norm or Linear before the block's Linears run (smooth.awq_smooth_block_), then round to
    nearest."""

    awq_grid: int = 20
    method: ClassVar[str] = "awq"
    # AWQ observes XᵀX in its own pass before the block is quantized (smooth.py); the
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
    grid: "minmax", or "kl" (KL pre-calibration, as for Rtn), which implies static groups.
    Add-ons: outliers (OWQ), sparse (dense-and-sparse), guided (GuidedQuant Hessians)."""

    act_order: bool = False
    static_groups: bool = False
    block_size: int = 128
    damp: float = 0.01
    outliers: Outliers | None = None
    sparse: DenseAndSparse | None = None
    guided: Guided | None = None
    grid: str = "minmax"
    method: ClassVar[str] = "gptq"
    reads: ClassVar[frozenset[str]] = frozenset({"xtx"})

    def validate(self) -> None:
        super().validate()
        require(self.block_size >= 1, f"quantize.block_size must be >= 1, got {self.block_size}")
        require(self.damp > 0, f"quantize.damp must be > 0, got {self.damp}")
        _check_grid(self)
        dynamic = not (self.act_order or self.static_groups or self.grid != "minmax") and self.group_size != -1
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
            return gptq(W, H, spec, keep=keep, static_groups=self.static_groups, grid=self.grid, **sweep)
        if self.outliers is not None:
            one = lambda W, H, keep: owq(W, H, spec, outlier_count(W.shape[1], self.outliers.fraction),  # noqa: E731
                                         feedback=self.outliers.feedback, keep=keep, **sweep)
        else:
            one = lambda W, H, keep: gptq(W, H, spec, keep=keep, static_groups=self.static_groups,  # noqa: E731
                                          grid=self.grid, **sweep)
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


def quantize_float_linear(linear: nn.Module, W: Tensor, step: Quantize, stats: LinearStats,
                          global_scale: Tensor | None = None) -> tuple[dict, FloatQuantized]:
    """quantize_linear on one of fpquant's formats: RTN or GPTQ onto it (NVFP4 on `global_scale` where
    given), and the static scale of the activations from the calibration inputs' maxima where the
    activation format has one."""
    fmt = FORMATS[step.format]
    if fmt.element == "e2m1" and W.shape[1] % fmt.group:
        raise ValueError(f"format {fmt.name} needs in_features divisible by {fmt.group}, got {W.shape[1]}")
    zeros = W == 0
    keep = ~zeros if zeros.any() else None
    if step.method == "gptq":
        qw = gptq_float(W, _hessian(stats, "gptq"), fmt, keep=keep, act_order=step.act_order,
                        block_size=step.block_size, damp=step.damp, g=global_scale)
    else:
        qw = rtn_float(W, fmt, global_scale)
    qw.act = step.act_format
    if step.act_format in STATIC_ACTS:
        qw.act_scale = act_static_scale(stats.x_absmax, step.act_format)
    W_new = qw.weight
    set_weight_matrix_(linear, W_new)
    metrics = {"format": fmt.name, "bits": fmt.element_bits, "group_size": fmt.group,
               "error": relative_error(W, W_new, stats), "avg_bits": qw.avg_bits}
    if keep is not None:
        metrics["sparsity"] = (W_new == 0).float().mean().item()
    if qw.damp is not None and qw.damp > step.damp:
        metrics["damp"] = qw.damp
    return metrics, qw


def quantize_linear(linear: nn.Module, step: Quantize, stats: LinearStats, fisher: FisherStats | None = None,
                    global_scale: Tensor | None = None) -> tuple[dict, Quantized]:
    """Quantize `linear` as `step` says (its quantize_weight). Its weight becomes the dequantized Ŵ
    at once (so later calibration forwards see it); the codes come back for packing into a
    QuantLinear (or the other modules of layers.quant_module).

    Zeros already in the weight (an earlier prune step) are kept exactly. `fisher` carries the
    gradient-weighted Hessians of a GuidedQuant step (hessian: guided); `global_scale` NVFP4's,
    shared with the Linears vLLM fuses with this one (fpquant.shared_global_scales).
    """
    W = weight_matrix(linear).detach().float().clone()  # [out, in]
    if step.format != "int":
        return quantize_float_linear(linear, W, step, stats, global_scale)
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
