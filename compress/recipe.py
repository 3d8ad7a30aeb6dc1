"""Recipes: frozen dataclasses read from YAML, validated before anything runs.

A recipe is an ordered list of steps plus the calibration and evaluation settings:

    calib: {source: c4, samples: 128, seqlen: 512, seed: 0}
    steps:
      - prune: {method: sparsegpt, sparsity: 0.5, pattern: "2:4"}
    eval: {data: wikitext2, seqlen: 2048}

Unknown keys, wrong types and out-of-range values are rejected with a message that names the
key (and a close match when there is one).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


@dataclass(frozen=True)
class Calib:
    """Calibration data: a text file, a dataset name (wikitext2, c4) or "self" (sampled from the model)."""

    source: str = "c4"
    samples: int = 128
    seqlen: int = 512
    seed: int = 0
    batch_size: int = 4  # samples per forward in the streaming pass; 4 was fastest on a 2-core CPU
    score_samples: int = 32  # the first samples, read by the scoring passes that plan non-uniform budgets
    # dtype of the hidden states kept between decoder blocks; "model" keeps the model's own (exact).
    # float16 halves their memory (and the files --stream writes) at a rounding of every block's input
    activation_dtype: Literal["model", "float32", "float16", "bfloat16"] = "model"

    def validate(self) -> None:
        _require(self.samples >= 1, f"calib.samples must be >= 1, got {self.samples}")
        _require(self.score_samples >= 1, f"calib.score_samples must be >= 1, got {self.score_samples}")
        _require(self.batch_size >= 1, f"calib.batch_size must be >= 1, got {self.batch_size}")
        _require(self.seqlen >= 2, f"calib.seqlen must be >= 2, got {self.seqlen}")


@dataclass(frozen=True)
class Eval:
    """Perplexity evaluation; `data` None means no evaluation. `dense` also evaluates the input model."""

    data: str | None = None
    seqlen: int = 2048
    max_tokens: int | None = None
    batch_size: int = 1
    dense: bool = True

    def validate(self) -> None:
        _require(self.seqlen >= 2, f"eval.seqlen must be >= 2, got {self.seqlen}")
        _require(self.batch_size >= 1, f"eval.batch_size must be >= 1, got {self.batch_size}")
        _require(
            self.max_tokens is None or self.max_tokens >= 2,
            f"eval.max_tokens must be >= 2, got {self.max_tokens}",
        )


@dataclass(frozen=True)
class Prune:
    """Unstructured or N:M pruning of the Linears inside decoder blocks.

    pattern: "unstructured" or "N:M" (keep N weights in every M consecutive inputs, e.g. "2:4").
    scope: for unstructured masks, "row" keeps the same count in every output row, "layer"
    compares all weights of a layer. SparseGPT chooses its mask per block of `block_size` columns.
    allocation: how `sparsity`, the mean over all targeted weights, is spread across layers
    (allocate.py): "uniform"; "owl" (blocks with more activation outliers keep more, OWL) or
    "dlp" (a block's median Wanda score is its unimportance: the larger, the more it is pruned,
    DLP), both within about ±allocation_range of the mean; "lamp" or "fisher": per Linear, the
    knapsack optimum of the summed LAMP scores or diagonal-Fisher saliencies ½FW² of the pruned
    weights, each layer within ±allocation_range; "measured": per block, the knapsack optimum of
    the loss increases measured by pruning each block alone at a few sparsities.
    method "maskllm" (MaskLLM, maskllm.py; pattern "2:4" only): the masks are learned end to end on
    the LM loss over the whole dense model, weights frozen, before any block is compressed: six
    logits per group of 4 inputs, one per 2-of-4 pattern, sampled by Gumbel-softmax at a temperature
    annealed linearly from tau_start to tau_end, trained by Adam (lr) on calib.batch_size windows per
    step for train_steps steps or `minutes`, whichever ends first; the logits start from the `init`
    mask (wanda, on the first calib.score_samples windows, or magnitude) with the strength `prior`.
    train_steps 0 gives the init mask itself.
    """

    method: Literal["magnitude", "wanda", "sparsegpt", "maskllm"] = "wanda"
    sparsity: float = 0.5
    pattern: str = "unstructured"
    scope: Literal["row", "layer"] = "row"
    block_size: int = 128
    damp: float = 0.01
    allocation: Literal["uniform", "owl", "dlp", "lamp", "fisher", "measured"] = "uniform"
    allocation_range: float = 0.1
    owl_m: float = 5.0  # OWL's outlier threshold: a score above owl_m times its layer's mean
    targets: tuple[str, ...] = ("*",)
    ignore: tuple[str, ...] = ()
    # maskllm only
    init: Literal["wanda", "magnitude"] = "wanda"
    train_steps: int = 100
    minutes: float | None = None
    lr: float = 0.05
    tau_start: float = 1.0
    tau_end: float = 0.05
    prior: float = 3.0

    @property
    def needs(self) -> set[str]:
        """Input statistics this step reads in the streaming pass (see stats.LinearStats)."""
        return {"magnitude": set(), "wanda": {"x_sq"}, "sparsegpt": {"xtx"}, "maskllm": set()}[self.method]

    @property
    def needs_data(self) -> bool:
        return bool(self.needs) or self.method == "maskllm"

    @property
    def n_m(self) -> tuple[int, int] | None:
        if self.pattern == "unstructured":
            return None
        n, m = (int(v) for v in self.pattern.split(":"))
        return n, m

    def validate(self) -> None:
        _require(0.0 <= self.sparsity < 1.0, f"prune.sparsity must be in [0, 1), got {self.sparsity}")
        if self.pattern != "unstructured":
            parts = self.pattern.split(":")
            ok = len(parts) == 2 and all(p.strip().isdigit() for p in parts)
            _require(ok, f"prune.pattern must be 'unstructured' or 'N:M' like '2:4', got {self.pattern!r}")
            n, m = self.n_m
            _require(0 < n < m, f"prune.pattern {self.pattern}: N:M needs 0 < N < M")
            _require(
                abs(self.sparsity - (1 - n / m)) < 1e-9,
                f"prune.pattern {self.pattern} keeps {n} of {m} weights, so sparsity must be "
                f"{1 - n / m:g}, got {self.sparsity:g}",
            )
            _require(
                self.block_size % m == 0,
                f"prune.block_size {self.block_size} must be a multiple of M={m}",
            )
        _require(self.block_size >= 1, f"prune.block_size must be >= 1, got {self.block_size}")
        _require(self.damp > 0, f"prune.damp must be > 0, got {self.damp}")
        _require(
            self.allocation == "uniform" or self.pattern == "unstructured",
            f"prune.allocation {self.allocation} needs unstructured sparsity (an N:M pattern fixes every layer's)",
        )
        _require(0 < self.allocation_range <= 0.5, f"prune.allocation_range must be in (0, 0.5], got "
                 f"{self.allocation_range}")
        _require(self.owl_m > 0, f"prune.owl_m must be > 0, got {self.owl_m}")
        self._validate_maskllm()

    def _validate_maskllm(self) -> None:
        keys = ("init", "train_steps", "minutes", "lr", "tau_start", "tau_end", "prior")
        if self.method != "maskllm":
            changed = [k for k in keys if getattr(self, k) != getattr(Prune, k)]
            _require(not changed, f"prune.{', prune.'.join(changed)} apply to method maskllm only, not {self.method}")
            return
        _require(self.pattern == "2:4", f"prune method maskllm learns 2:4 masks: set pattern '2:4', got "
                 f"{self.pattern!r}")
        _require(self.train_steps >= 0, f"prune.train_steps must be >= 0, got {self.train_steps}")
        _require(self.minutes is None or self.minutes > 0, f"prune.minutes must be > 0, got {self.minutes}")
        _require(self.lr > 0, f"prune.lr must be > 0, got {self.lr}")
        _require(self.tau_end > 0, f"prune.tau_end must be > 0, got {self.tau_end}")
        _require(self.tau_start >= self.tau_end, f"prune.tau_start must be >= tau_end ({self.tau_end}), got "
                 f"{self.tau_start}")
        _require(self.prior >= 0, f"prune.prior must be >= 0, got {self.prior}")


@dataclass(frozen=True)
class Quantize:
    """Weight-only integer quantization of the Linears inside decoder blocks.

    method: "rtn" (round to nearest), "gptq" (OBS error feedback, needs XᵀX), "awq"
    (activation-aware scales folded into the preceding norm or Linear, then round to nearest).
    group_size: inputs sharing a scale, -1 for one per output row; a last group may be shorter.
    act_order: GPTQ visits inputs by decreasing activation energy (groups stay contiguous: static).
    static_groups: GPTQ takes every group's grid from the weights before the sweep.
    lm_head: also quantize the output head (untied from the input embeddings, which stay as they
    are); GPTQ reads the final norm's outputs, AWQ (no smoothing pair there) rounds to nearest.
    allocation "fisher" with bits_choices and avg_bits: mixed precision, each Linear's bit width
    chosen from bits_choices so that the parameter-weighted mean of the code bits is at most
    avg_bits and the summed diagonal-Fisher error ½ Σ F (W − Ŵ_rtn)² is least (allocate.py).
    target_bytes instead of avg_bits: the whole checkpoint's tensors (quantized Linears with their
    scales and zero points, plus everything left unquantized) fit in that many bytes.
    `bits` is then used only by lm_head.
    method "leanquant" (LeanQuant, nonuniform.py): the GPTQ sweep on a non-uniform grid of 2^bits
    levels per output row (group_size -1), from a k-means weighted by U_jj^(−lut_exponent), U the
    Cholesky factor of H⁻¹; stored as codes and a float16 table per row.
    outlier_fraction (OWQ, outliers.py; gptq only): that share of each Linear's input columns (at
    least one), the most sensitive by H_jj·‖ΔW_:j‖², stays in float16 and GPTQ quantizes the rest;
    outlier_feedback: the sweep's error feedback also updates those columns (OWQ's code), else they
    keep their original values.
    sparse_fraction (dense-and-sparse, densesparse.py; rtn or gptq): that share of each Linear's
    weights (at least one), the top ones by sparse_score, is taken out before the grids are chosen
    and kept in float16 next to the quantized rest; sparse_score "sensitivity" ranks by
    H_jj·(W_ij − RTN(W)_ij)² (needs XᵀX, also under rtn), "magnitude" by |W_ij|.
    hessian "guided" (GuidedQuant, guided.py; gptq or leanquant): each of guided_groups groups of
    output channels is quantized on its own Hessian Σ_t (∂ℓ/∂z_t)² x_t x_tᵀ, the gradients of the
    LM loss with respect to the group's outputs from one backward pass over the dense model on the
    first calib.score_samples windows.
    act_bits: also quantize each Linear's input activations, per token, symmetric, on the same grid
    convention (simulated: fake quant in the forward, actquant.py); lm_head keeps float inputs.
    smooth (with act_bits): "runtime" divides the inputs by their per-channel maxima over each group
    of smooth_tokens consecutive tokens of a forward call (all of them when None) before rounding and
    multiplies the scales back into the weight's input columns (Rotated Runtime Smooth, Yi et al.
    2025); "smoothquant" migrates s = max|X|^α / max|W|^(1−α), α = smooth_alpha, from calibration
    maxima into the preceding norm or Linear offline (SmoothQuant, Xiao et al. 2023).
    """

    method: Literal["rtn", "gptq", "awq", "leanquant"] = "gptq"
    bits: int = 4
    group_size: int = 128
    sym: bool = True
    act_order: bool = False
    static_groups: bool = False
    block_size: int = 128
    damp: float = 0.01
    awq_grid: int = 20
    lm_head: bool = False
    allocation: Literal["uniform", "fisher"] = "uniform"
    bits_choices: tuple[int, ...] = ()
    avg_bits: float | None = None
    target_bytes: int | None = None
    act_bits: int | None = None
    smooth: Literal["none", "runtime", "smoothquant"] = "none"
    smooth_alpha: float = 0.5
    smooth_tokens: int | None = None
    targets: tuple[str, ...] = ("*",)
    ignore: tuple[str, ...] = ()
    outlier_fraction: float = 0.0
    outlier_feedback: bool = True
    sparse_fraction: float = 0.0
    sparse_score: Literal["sensitivity", "magnitude"] = "sensitivity"
    lut_exponent: float = 4.0
    hessian: Literal["layer", "guided"] = "layer"
    guided_groups: int = 4

    @property
    def needs(self) -> set[str]:
        # AWQ observes XᵀX in its own pass before the block is quantized (awq_smooth_block_);
        # the quantizing pass only needs Σx² for the error it reports. SmoothQuant's maxima are
        # observed in its own pass too (smoothquant_block_), which needs the block's inputs.
        needs = {"rtn": set(), "gptq": {"xtx"}, "awq": {"x_sq"}, "leanquant": {"xtx"}}[self.method]
        sensitivity = self.sparse_fraction > 0 and self.sparse_score == "sensitivity"  # reads H_jj
        return needs | ({"x_sq"} if self.smooth == "smoothquant" else set()) | ({"xtx"} if sensitivity else set())

    def validate(self) -> None:
        _require(2 <= self.bits <= 8, f"quantize.bits must be in [2, 8], got {self.bits}")
        _require(
            self.group_size == -1 or self.group_size >= 1,
            f"quantize.group_size must be >= 1, or -1 for one group per row; got {self.group_size}",
        )
        _require(self.block_size >= 1, f"quantize.block_size must be >= 1, got {self.block_size}")
        _require(self.damp > 0, f"quantize.damp must be > 0, got {self.damp}")
        _require(self.awq_grid >= 1, f"quantize.awq_grid must be >= 1, got {self.awq_grid}")
        for b in self.bits_choices:
            _require(2 <= b <= 8, f"quantize.bits_choices must be in [2, 8], got {b}")
        if self.allocation == "uniform":
            _require(not self.bits_choices and self.avg_bits is None and self.target_bytes is None,
                     "quantize.bits_choices, avg_bits and target_bytes need allocation: fisher")
        else:
            _require(len(set(self.bits_choices)) >= 2 and (self.avg_bits is None) != (self.target_bytes is None),
                     f"quantize.allocation {self.allocation} needs bits_choices (two or more) and one budget: "
                     "avg_bits or target_bytes")
            lo, hi = min(self.bits_choices), max(self.bits_choices)
            _require(self.avg_bits is None or lo <= self.avg_bits <= hi,
                     f"quantize.avg_bits must be in [{lo}, {hi}] (the bits_choices), got {self.avg_bits}")
            _require(self.target_bytes is None or self.target_bytes > 0,
                     f"quantize.target_bytes must be > 0, got {self.target_bytes}")
            _require(self.target_bytes is None or not self.lm_head,
                     "quantize.target_bytes does not cover lm_head quantization; leave lm_head false")
        self._validate_seed_methods()
        self._validate_dense_sparse()
        _require(self.act_bits is None or 2 <= self.act_bits <= 8,
                 f"quantize.act_bits must be in [2, 8], got {self.act_bits}")
        _require(self.act_bits is None or (self.method != "leanquant" and self.outlier_fraction == 0),
                 "quantize.act_bits combines with the rtn, gptq and awq grids, not with leanquant or outlier_fraction")
        _require(self.smooth == "none" or self.act_bits is not None,
                 f"quantize.smooth {self.smooth} smooths activations for their quantization: it needs act_bits")
        _require(self.smooth != "smoothquant" or self.method != "awq",
                 "quantize.smooth smoothquant and method awq both migrate scales into the same ops; use rtn or gptq")
        _require(0 < self.smooth_alpha < 1, f"quantize.smooth_alpha must be in (0, 1), got {self.smooth_alpha}")
        _require(self.smooth_tokens is None or self.smooth_tokens >= 1,
                 f"quantize.smooth_tokens must be >= 1, got {self.smooth_tokens}")
        dynamic = self.method == "gptq" and not (self.act_order or self.static_groups) and self.group_size != -1
        _require(
            not dynamic or self.block_size % self.group_size == 0,
            f"quantize.block_size {self.block_size} must be a multiple of group_size {self.group_size} "
            "(or set static_groups: true)",
        )


    def _validate_dense_sparse(self) -> None:
        _require(0.0 <= self.sparse_fraction <= 0.1,
                 f"quantize.sparse_fraction must be in [0, 0.1] (each detached weight costs 48 bits), "
                 f"got {self.sparse_fraction}")
        if self.sparse_fraction == 0:
            _require(self.sparse_score == "sensitivity", "quantize.sparse_score needs sparse_fraction > 0")
            return
        _require(self.method in ("rtn", "gptq"),
                 f"quantize.sparse_fraction (dense-and-sparse) needs method rtn or gptq, got {self.method}")
        clash = [k for k, on in [("outlier_fraction", self.outlier_fraction > 0),
                                 ("act_bits", self.act_bits is not None), ("hessian guided", self.hessian != "layer"),
                                 ("allocation fisher", self.allocation != "uniform")] if on]
        _require(not clash, f"quantize.sparse_fraction (dense-and-sparse) does not combine with {', '.join(clash)}")

    def _validate_seed_methods(self) -> None:
        """OWQ, LeanQuant and GuidedQuant options."""
        _require(0.0 <= self.outlier_fraction < 0.5,
                 f"quantize.outlier_fraction must be in [0, 0.5), got {self.outlier_fraction}")
        _require(self.outlier_fraction == 0 or self.method == "gptq",
                 f"quantize.outlier_fraction (OWQ) needs method gptq, got {self.method}")
        _require(self.method != "leanquant" or self.group_size == -1,
                 f"quantize.method leanquant learns one grid per output row: set group_size -1 (a table of "
                 f"2^bits float16 levels per group of {self.group_size} would cost {2 ** self.bits * 16}/"
                 f"{self.group_size} bits per weight)")
        _require(self.lut_exponent >= 0, f"quantize.lut_exponent must be >= 0, got {self.lut_exponent}")
        _require(self.hessian == "layer" or self.method in ("gptq", "leanquant"),
                 f"quantize.hessian guided needs method gptq or leanquant, got {self.method}")
        _require(self.hessian == "layer" or self.outlier_fraction == 0,
                 "quantize.hessian guided does not combine with outlier_fraction (each output group would keep "
                 "its own columns)")
        _require(self.hessian == "layer" or not self.lm_head,
                 "quantize.hessian guided does not cover lm_head (no gradient-weighted Hessian there); "
                 "leave lm_head false")
        _require(self.guided_groups >= 1, f"quantize.guided_groups must be >= 1, got {self.guided_groups}")
        seed = self.method == "leanquant" or self.outlier_fraction > 0 or self.hessian == "guided"
        _require(not seed or self.allocation == "uniform",
                 "quantize.allocation fisher (mixed bits) takes rtn, gptq or awq without outlier_fraction or "
                 "hessian guided")


@dataclass(frozen=True)
class LowRank:
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

    @property
    def needs(self) -> set[str]:
        return {"svd": set(), "whitened": {"xtx"}, "asvd": {"x_sq"}, "fwsvd": set(), "gfwsvd": set()}[self.method]

    @property
    def allocation(self) -> str:
        return "uniform"

    @property
    def needs_data(self) -> bool:
        return self.method != "svd"

    def validate(self) -> None:
        _require(0.0 < self.keep < 1.0, f"lowrank.keep must be in (0, 1), got {self.keep}")
        _require(self.damp > 0, f"lowrank.damp must be > 0, got {self.damp}")
        _require(self.asvd_alpha > 0, f"lowrank.asvd_alpha must be > 0, got {self.asvd_alpha}")


@dataclass(frozen=True)
class Structured:
    """Remove whole units so that the model really shrinks (structured.py).

    unit: "channels" (MLP intermediate channels: gate/up rows with the matching down columns),
    "heads" (attention query heads, the same number from every KV group so GQA still holds; with
    kv_groups, whole KV groups: a key/value head with all its query heads), or "layers" (whole
    decoder blocks, the least influential by ShortGPT's 1 − cos(input, output) on the dense model).
    fraction: of the units of each MLP, attention or of the decoder blocks; heads are rounded to
    whole heads per KV group, channels to a multiple of `multiple` kept.
    score: "magnitude" (the unit's squared weights), "wanda" (the output energy the unit feeds the
    next Linear on calibration inputs, activation-aware), "fisher" (½ Σ F w² over the unit's
    weights, diagonal Fisher on the dense model, as LLM-Pruner's second-order Taylor term), "oba"
    (Optimal Brain Apoptosis, oba.py: the loss change gᵀδ + ½δᵀHδ of removing the unit, with the exact
    Hessian over every block's consumer weights from Hessian-vector products on the dense model,
    oba_probes sign probes per calibration window), or "influence" (layers only).
    compensate: refit the kept input columns of the consumer (down_proj, o_proj) by least squares on
    calibration activations, so the layer's output changes least (FLAP-like, no training).
    allocation "uniform": every decoder block loses the same units, so the result is a stock
    checkpoint with its config updated (intermediate_size, num_attention_heads, num_key_value_heads,
    num_hidden_layers). "fisher" (channels): each block's count within fraction ± allocation_range,
    the same total, chosen so the summed Fisher saliency of the removed channels is least
    (allocate.py's knapsack); the per-layer shapes are then recorded in compression_config and the
    checkpoint loads through compress.load.
    """

    unit: Literal["channels", "heads", "layers"] = "channels"
    fraction: float = 0.2
    score: Literal["magnitude", "wanda", "fisher", "oba", "influence"] = "wanda"
    compensate: bool = True
    kv_groups: bool = False
    multiple: int = 1
    damp: float = 0.01
    allocation: Literal["uniform", "fisher"] = "uniform"
    allocation_range: float = 0.15
    oba_probes: int = 16  # Hessian-vector products per window for score oba (a power of two)

    @property
    def needs(self) -> set[str]:
        return set()  # structured.py observes the consumers' inputs in its own pass over each block

    @property
    def needs_data(self) -> bool:
        return (self.unit == "layers" or self.score in ("wanda", "fisher", "oba") or self.compensate
                or self.allocation == "fisher")

    def validate(self) -> None:
        _require(0.0 < self.fraction < 1.0, f"structured.fraction must be in (0, 1), got {self.fraction}")
        _require((self.unit == "layers") == (self.score == "influence"),
                 f"structured.score {self.score} does not apply to unit {self.unit} "
                 "(layers take influence; channels and heads take magnitude, wanda, fisher or oba)")
        _require(self.oba_probes >= 1 and self.oba_probes & (self.oba_probes - 1) == 0,
                 f"structured.oba_probes must be a power of two (1, 2, 4, ...), got {self.oba_probes}")
        _require(self.multiple >= 1, f"structured.multiple must be >= 1, got {self.multiple}")
        _require(self.damp > 0, f"structured.damp must be > 0, got {self.damp}")
        _require(not self.kv_groups or self.unit == "heads", "structured.kv_groups applies to unit heads only")
        _require(self.allocation == "uniform" or self.unit == "channels",
                 f"structured.allocation {self.allocation} applies to unit channels only")
        _require(0 < self.allocation_range <= 0.5,
                 f"structured.allocation_range must be in (0, 0.5], got {self.allocation_range}")


@dataclass(frozen=True)
class Rotate:
    """Rotate the residual stream by a random orthogonal Q folded into the weights (QuaRot, Ashkboos
    et al. 2024; rotate.py): the model computes the same function, but its hidden states and the
    weights that read them have their outliers spread over all channels, which is what 4-bit
    activations need. The norms' weights are folded into the Linears that read them first.

    method: "hadamard" (a randomized Hadamard matrix H·diag(±1)/√n; for a width n = 2^k·m with m odd,
    the Kronecker product of a random orthogonal m×m and the 2^k Hadamard) or "random" (a random
    orthogonal matrix from the QR of a Gaussian one). seed: for the signs and the random factor.
    """

    method: Literal["hadamard", "random"] = "hadamard"
    seed: int = 0

    @property
    def needs(self) -> set[str]:
        return set()

    @property
    def allocation(self) -> str:
        return "uniform"

    def validate(self) -> None:
        pass


@dataclass(frozen=True)
class Distill:
    """Recover what the earlier steps lost by training the compressed model toward the dense
    teacher's next-token distributions (distill.py), on calibration text, never the evaluation's.

    The teacher is the model before any step: before the streaming pass it runs once over `samples`
    windows of `seqlen` tokens of calib.source (drawn with `seed`, apart from the calibration
    windows) and keeps, per position, `samples_per_token` token ids drawn with replacement from its
    softmax, as ids and counts (Random Sampling KD, Anshumann et al. 2025). After the pass the
    targeted Linears train on the cross-entropy against those samples' empirical distribution, in
    batches of `batch_size` windows with AdamW at `lr` (10 warmup steps, then a cosine to 0 over the
    budget), until `steps` optimizer steps or `minutes` of wall time for the whole step (teacher pass
    included), whichever comes first. train "kept": the weights themselves, zeros (pruned positions) held at zero;
    "lora": rank-`lora_rank` adapters (scale lora_alpha / lora_rank), merged into the weights at the
    end and the zeros re-applied (LoRAPrune's merge, Zhang et al. 2024). precision "bfloat16": the
    training forward and backward run under bfloat16 autocast (weights, gradients' accumulation and
    AdamW's states stay float32); the teacher always runs in the model's own dtype.
    """

    steps: int = 1000
    minutes: float = 30.0
    lr: float = 1e-4
    train: Literal["kept", "lora"] = "kept"
    lora_rank: int = 8
    lora_alpha: float = 16.0
    samples_per_token: int = 64
    samples: int = 64
    seqlen: int = 512
    batch_size: int = 2
    seed: int = 1
    precision: Literal["float32", "bfloat16"] = "float32"
    targets: tuple[str, ...] = ("*",)
    ignore: tuple[str, ...] = ()

    @property
    def needs(self) -> set[str]:
        return set()

    @property
    def allocation(self) -> str:
        return "uniform"

    @property
    def needs_data(self) -> bool:
        return True

    def calib(self, source: str) -> Calib:
        """Where the distillation windows come from: the recipe's calibration source, this step's count."""
        return Calib(source=source, samples=self.samples, seqlen=self.seqlen, seed=self.seed)

    def validate(self) -> None:
        _require(self.steps >= 1, f"distill.steps must be >= 1, got {self.steps}")
        _require(self.minutes > 0, f"distill.minutes must be > 0, got {self.minutes}")
        _require(0 < self.lr < 1, f"distill.lr must be in (0, 1), got {self.lr}")
        _require(self.lora_rank >= 1, f"distill.lora_rank must be >= 1, got {self.lora_rank}")
        _require(self.lora_alpha > 0, f"distill.lora_alpha must be > 0, got {self.lora_alpha}")
        _require(1 <= self.samples_per_token <= 255,  # counts are stored as uint8
                 f"distill.samples_per_token must be in [1, 255], got {self.samples_per_token}")
        _require(self.samples >= 1, f"distill.samples must be >= 1, got {self.samples}")
        _require(self.seqlen >= 2, f"distill.seqlen must be >= 2, got {self.seqlen}")
        _require(self.batch_size >= 1, f"distill.batch_size must be >= 1, got {self.batch_size}")


Step = Rotate | Structured | Prune | LowRank | Quantize | Distill
STEP_TYPES: dict[str, type] = {"rotate": Rotate, "structured": Structured, "prune": Prune, "lowrank": LowRank,
                               "quantize": Quantize, "distill": Distill}


@dataclass(frozen=True)
class Recipe:
    steps: tuple[Step, ...]
    calib: Calib = field(default_factory=Calib)
    eval: Eval = field(default_factory=Eval)

    @property
    def needs(self) -> set[str]:
        return set().union(*(s.needs for s in self.steps))

    @property
    def needs_data(self) -> bool:
        """Whether calibration text is read: for input statistics, or to plan a non-uniform budget."""
        return (bool(self.needs) or any(s.allocation not in ("uniform", "lamp") for s in self.steps)
                or any(getattr(s, "needs_data", False) for s in self.steps))

    def validate(self) -> None:
        _require(len(self.steps) > 0, "recipe has no steps")
        self.calib.validate()
        self.eval.validate()
        for step in self.steps:
            step.validate()
        order = [list(STEP_TYPES.values()).index(type(s)) for s in self.steps]
        _require(not any(isinstance(s, LowRank) for s in self.steps)
                 or not any(isinstance(s, Quantize) and s.method == "awq" for s in self.steps),
                 "quantize method awq cannot follow lowrank (its smoothing pairs are the unfactored Linears); "
                 "use rtn or gptq")
        _require(not any(isinstance(s, LowRank) for s in self.steps) or not any(
                     isinstance(s, Quantize) and (s.method == "leanquant" or s.outlier_fraction > 0
                                                  or s.sparse_fraction > 0 or s.hessian == "guided")
                     for s in self.steps),
                 "quantize method leanquant, outlier_fraction, sparse_fraction and hessian guided cannot follow "
                 "lowrank (the factors are stored as plain quantized Linears; guided Hessians belong to the "
                 "unfactored ones)")
        _require(order == sorted(order), "steps must come in the order rotate, structured, prune, lowrank, quantize, "
                 "distill (the rotation is folded in first, units are removed next; quantization is the last step on "
                 "a Linear; distillation trains what they left)")
        self._validate_distill()
        _require(sum(isinstance(s, Rotate) for s in self.steps) <= 1, "a recipe can rotate the model once")
        _require(not any(isinstance(s, Prune) and s.method == "maskllm" for s in self.steps) or not any(
                     isinstance(s, LowRank) or isinstance(s, Structured) and s.unit != "layers"
                     or isinstance(s, Prune) and s.method != "maskllm" for s in self.steps)
                 and sum(isinstance(s, Prune) for s in self.steps) <= 1,
                 "prune method maskllm learns its masks on the whole model before any block is compressed: it "
                 "cannot combine with another prune step, lowrank, or structured channels or heads removal")
        _require(not any(isinstance(s, LowRank) for s in self.steps)
                 or not any(isinstance(s, Quantize) and s.act_bits is not None for s in self.steps),
                 "quantize.act_bits cannot follow lowrank (activation quantization wraps unfactored Linears)")

    @property
    def distill(self) -> Distill | None:
        """The distill step, if the recipe has one (it is the last)."""
        return next((s for s in self.steps if isinstance(s, Distill)), None)

    def _validate_distill(self) -> None:
        _require(sum(isinstance(s, Distill) for s in self.steps) <= 1, "a recipe can have one distill step")
        if self.distill is None:
            return
        _require(not any(isinstance(s, Quantize | LowRank) for s in self.steps),
                 "distill trains float weights: it cannot follow quantize (integer codes do not train) or lowrank "
                 "(factored Linears); use it after prune, structured or rotate")


def load_recipe(path: str | Path, overrides: Sequence[str] = ()) -> Recipe:
    """Read a YAML recipe, apply `key=value` overrides (e.g. "steps.0.sparsity=0.6"), validate."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"recipe not found: {path}")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")  # not the locale's encoding: a recipe reads the same everywhere
    except UnicodeDecodeError as e:
        raise ValueError(f"recipe {path} is not UTF-8 text: invalid byte 0x{data[e.start]:02x} "
                         f"at offset {e.start}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ValueError(f"recipe {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    return recipe_from_dict(raw if raw is not None else {}, overrides)


def recipe_from_dict(raw: dict, overrides: Sequence[str] = ()) -> Recipe:
    _require(isinstance(raw, dict), "a recipe must be a mapping with a 'steps' list")
    raw = _apply_overrides(raw, overrides)
    _check_keys(raw, {"steps", "calib", "eval"}, "recipe")
    steps_raw = raw.get("steps")
    _require(isinstance(steps_raw, list), "recipe 'steps' must be a list")
    steps = tuple(_parse_step(i, s) for i, s in enumerate(steps_raw))
    recipe = Recipe(
        steps=steps,
        calib=_build(Calib, raw.get("calib") or {}, "calib"),
        eval=_build(Eval, raw.get("eval") or {}, "eval"),
    )
    recipe.validate()
    return recipe


def dump_recipe(recipe: Recipe) -> str:
    """The resolved recipe as YAML; load_recipe of it gives back an equal Recipe."""
    kind = {cls: name for name, cls in STEP_TYPES.items()}
    data = {
        "calib": _plain(dataclasses.asdict(recipe.calib)),
        "steps": [{kind[type(s)]: _plain(dataclasses.asdict(s))} for s in recipe.steps],
        "eval": _plain(dataclasses.asdict(recipe.eval)),
    }
    return yaml.safe_dump(data, sort_keys=False)


def _plain(d: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def _parse_step(i: int, raw: Any) -> Step:
    where = f"steps[{i}]"
    _require(
        isinstance(raw, dict) and len(raw) == 1,
        f"{where} must be a mapping with one key naming its kind ({', '.join(STEP_TYPES)})",
    )
    (kind, body), = raw.items()
    if kind not in STEP_TYPES:
        raise ValueError(f"{where}: unknown step kind {kind!r}{_did_you_mean(kind, STEP_TYPES)}; "
                         f"valid: {', '.join(STEP_TYPES)}")
    return _build(STEP_TYPES[kind], body or {}, f"{where}.{kind}")


def _build(cls: type, raw: Any, where: str):
    _require(isinstance(raw, dict), f"{where} must be a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    _check_keys(raw, set(names), where)
    return cls(**{k: _coerce(v, hints[k], f"{where}.{k}") for k, v in raw.items()})


def _check_keys(raw: dict, valid: set[str], where: str) -> None:
    for key in raw:
        if key not in valid:
            raise ValueError(f"{where}: unknown key {key!r}{_did_you_mean(str(key), valid)}; "
                             f"valid keys: {', '.join(sorted(valid))}")


def _did_you_mean(word: str, options) -> str:
    close = difflib.get_close_matches(word, list(options), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Check `value` against a field's type; ints are accepted where floats are expected."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(value, inner, where)
    if origin is Literal:
        if value not in args:
            raise ValueError(f"{where} must be one of {', '.join(map(str, args))}, got {value!r}"
                             f"{_did_you_mean(str(value), map(str, args))}")
        return value
    if origin is tuple:
        items = [value] if isinstance(value, str) else value
        _require(isinstance(items, list), f"{where} must be a list of {args[0].__name__}, got {value!r}")
        return tuple(_coerce(v, args[0], where) for v in items)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is int and isinstance(value, bool) or not isinstance(value, hint):
        raise ValueError(f"{where} must be {hint.__name__}, got {value!r}")
    if hint is float and not math.isfinite(value):  # YAML .inf passes one-sided checks such as damp > 0
        raise ValueError(f"{where} must be a finite number, got {value!r}")
    return value


def _apply_overrides(raw: dict, overrides: Sequence[str]) -> dict:
    """Apply "a.b.0.c=value" overrides; a step index may skip the step's kind: steps.0.sparsity."""
    raw = yaml.safe_load(yaml.safe_dump(raw))  # deep copy of plain data
    for item in overrides:
        key, sep, text = item.partition("=")
        _require(bool(sep) and bool(key), f"override {item!r} must look like key=value")
        value = yaml.safe_load(text)
        parts = key.split(".")
        node: Any = raw
        for j, part in enumerate(parts[:-1]):
            if isinstance(node, list):
                _require(part.isdigit() and int(part) < len(node), f"override {key}: no index {part}")
                node = node[int(part)]
                if isinstance(node, dict) and len(node) == 1 and parts[j + 1] not in STEP_TYPES:
                    node = next(iter(node.values()))  # steps.0.sparsity -> the step's own mapping
            else:
                _require(isinstance(node, dict), f"override {key}: {part} is not a mapping")
                node = node.setdefault(part, {})
        last = parts[-1]
        if isinstance(node, list):
            _require(last.isdigit() and int(last) < len(node), f"override {key}: no index {last}")
            node[int(last)] = value
        else:
            _require(isinstance(node, dict), f"override {key}: cannot set {last}")
            node[last] = value
    return raw


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)
