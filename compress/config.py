"""What every step config shares: the pruning and quantization bases, the add-ons a quantizer can
carry, and validation on construction.

A step config is a frozen dataclass that checks itself when it is built, so `Wanda(sparsity=1.5)`
in Python fails with the same one line as the YAML `prune: {method: wanda, sparsity: 1.5}`. Each
method's own class sits next to its code (prune.py: Magnitude, Wanda, SparseGpt; maskllm.py:
MaskLlm; quantize.py: Rtn, Awq; gptq.py: Gptq; nonuniform.py: LeanQuant; hqq.py: Hqq) and
declares the input statistics it reads (`needs`, see stats.LinearStats). recipe.py maps YAML onto
these classes; an add-on's YAML keys are flat in the step (`act_bits: 4`, `smooth: runtime`), its
`YAML` table says which field each one fills, and `SWITCH` names the key that turns it on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from .fpquant import ACT_FORMAT, FORMATS, STATIC_ACTS


def require(ok: bool, message: str) -> None:
    """A config check: one line naming the key, as recipe.py's YAML errors do."""
    if not ok:
        raise ValueError(message)


class Config:
    """Mixin for frozen config dataclasses: `validate` runs when an instance is built."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        pass


class StepConfig(Config):
    """Mixin for a recipe step's config: what a step declares unless it says otherwise."""

    @property
    def needs(self) -> set[str]:
        """Input statistics the streaming pass collects for it (see stats.LinearStats): none."""
        return set()

    @property
    def allocation(self) -> str:
        """How its budget is spread over layers: the same everywhere."""
        return "uniform"


class AddOn(Config):
    """A small option object of a quantizer. YAML: its keys sit flat in the step; SWITCH is (the key
    that turns it on, the value meaning off, the value meaning on or None when the key's value is a
    field); YAML maps each key to the field it fills."""

    SWITCH: ClassVar[tuple[str, Any, Any]]
    YAML: ClassVar[dict[str, str]]


@dataclass(frozen=True)
class ActQuant(AddOn):
    """Also quantize each Linear's input activations, per token, symmetric, on the weights' grid
    convention (simulated: fake quant in the forward, actquant.py); lm_head keeps float inputs.
    smooth "runtime" divides the inputs by their per-channel maxima over each group of `tokens`
    consecutive tokens of a forward call (all of them when None) before rounding and multiplies the
    scales back into the weight's input columns (Rotated Runtime Smooth, Yi et al. 2025);
    "smoothquant" migrates s = max|X|^α / max|W|^(1−α), α = alpha, from calibration maxima into the
    preceding norm or Linear offline (SmoothQuant, Xiao et al. 2023)."""

    bits: int = 4
    smooth: Literal["none", "runtime", "smoothquant"] = "none"
    alpha: float = 0.5
    tokens: int | None = None
    SWITCH: ClassVar = ("act_bits", None, None)
    YAML: ClassVar = {"act_bits": "bits", "smooth": "smooth", "smooth_alpha": "alpha", "smooth_tokens": "tokens"}

    def validate(self) -> None:
        require(2 <= self.bits <= 8, f"quantize.act_bits must be in [2, 8], got {self.bits}")
        require(0 < self.alpha < 1, f"quantize.smooth_alpha must be in (0, 1), got {self.alpha}")
        require(self.tokens is None or self.tokens >= 1, f"quantize.smooth_tokens must be >= 1, got {self.tokens}")


@dataclass(frozen=True)
class Outliers(AddOn):
    """OWQ (outliers.py): that `fraction` of each Linear's input columns (at least one), the most
    sensitive by H_jj·‖ΔW_:j‖², stays in float16 and GPTQ quantizes the rest; `feedback`: the sweep's
    error feedback also updates those columns (OWQ's code), else they keep their original values."""

    fraction: float = 0.01
    feedback: bool = True
    SWITCH: ClassVar = ("outlier_fraction", 0.0, None)
    YAML: ClassVar = {"outlier_fraction": "fraction", "outlier_feedback": "feedback"}

    def validate(self) -> None:
        require(0.0 < self.fraction < 0.5, f"quantize.outlier_fraction must be in [0, 0.5), got {self.fraction}")


@dataclass(frozen=True)
class DenseAndSparse(AddOn):
    """Dense-and-sparse (densesparse.py): that `fraction` of each Linear's weights (at least one), the
    top ones by `score`, is taken out before the grids are chosen and kept in float16 next to the
    quantized rest; "sensitivity" ranks by H_jj·(W_ij − RTN(W)_ij)² (reads XᵀX), "magnitude" by |W_ij|."""

    fraction: float = 0.005
    score: Literal["sensitivity", "magnitude"] = "sensitivity"
    SWITCH: ClassVar = ("sparse_fraction", 0.0, None)
    YAML: ClassVar = {"sparse_fraction": "fraction", "sparse_score": "score"}

    def validate(self) -> None:
        require(0.0 < self.fraction <= 0.1, "quantize.sparse_fraction must be in [0, 0.1] (each detached weight "
                f"costs 48 bits), got {self.fraction}")


@dataclass(frozen=True)
class Guided(AddOn):
    """GuidedQuant (guided.py): each of `groups` groups of output channels is quantized on its own
    Hessian Σ_t (∂ℓ/∂z_t)² x_t x_tᵀ, the gradients of the LM loss with respect to the group's outputs
    from one backward pass over the dense model on the first calib.score_samples windows."""

    groups: int = 4
    SWITCH: ClassVar = ("hessian", "layer", "guided")
    YAML: ClassVar = {"guided_groups": "groups"}

    def validate(self) -> None:
        require(self.groups >= 1, f"quantize.guided_groups must be >= 1, got {self.groups}")


@dataclass(frozen=True)
class BitBudget(AddOn):
    """Mixed precision (allocate.py): each Linear's bit width is chosen from `choices`, or its format
    from `formats` (fpquant.FORMATS, and "bf16": left unquantized), so that the parameter-weighted
    mean of the stored bits (scales counted, as `compress inspect` counts them; code bits alone for
    integer widths) is at most `avg_bits`, or the whole checkpoint's tensors fit in `target_bytes`,
    and the summed diagonal-Fisher error ½ Σ F (W − Ŵ_rtn)² is least. The step's `bits` is then used
    only by lm_head."""

    choices: tuple[int, ...] = ()
    avg_bits: float | None = None
    target_bytes: int | None = None
    formats: tuple[str, ...] = ()
    SWITCH: ClassVar = ("allocation", "uniform", "fisher")
    YAML: ClassVar = {"bits_choices": "choices", "avg_bits": "avg_bits", "target_bytes": "target_bytes",
                      "format_choices": "formats"}

    def validate(self) -> None:
        for b in self.choices:
            require(2 <= b <= 8, f"quantize.bits_choices must be in [2, 8], got {b}")
        for f in self.formats:
            require((f in FORMATS and f != "int8") or f == "bf16", "quantize.format_choices must be among "
                    f"{', '.join(f for f in FORMATS if f != 'int8')} and bf16 (weight formats), got {f!r}")
        options = len(set(self.choices)) if self.choices else len(set(self.formats))
        require(not (self.choices and self.formats), "quantize: give bits_choices or format_choices, not both")
        require(options >= 2 and (self.avg_bits is None) != (self.target_bytes is None),
                "quantize.allocation fisher needs bits_choices or format_choices (two or more) and one budget: "
                "avg_bits or target_bytes")
        if self.choices:
            lo, hi = min(self.choices), max(self.choices)
            require(self.avg_bits is None or lo <= self.avg_bits <= hi,
                    f"quantize.avg_bits must be in [{lo}, {hi}] (the bits_choices), got {self.avg_bits}")
        require(self.target_bytes is None or self.target_bytes > 0,
                f"quantize.target_bytes must be > 0, got {self.target_bytes}")


@dataclass(frozen=True)
class Prune(Config):
    """What every pruning method shares: unstructured or N:M pruning of the Linears inside decoder
    blocks. Build a method's class (prune.Magnitude, Wanda, SparseGpt, maskllm.MaskLlm).

    pattern: "unstructured" or "N:M" (keep N weights in every M consecutive inputs, e.g. "2:4").
    scope: for unstructured masks, "row" keeps the same count in every output row, "layer"
    compares all weights of a layer.
    allocation: how `sparsity`, the mean over all targeted weights, is spread across layers
    (allocate.py): "uniform"; "owl" (blocks with more activation outliers keep more, OWL; a score
    above owl_m times its layer's mean is an outlier) or "dlp" (a block's median Wanda score is its
    unimportance: the larger, the more it is pruned, DLP), both within about ±allocation_range of the
    mean; "lamp" or "fisher": per Linear, the knapsack optimum of the summed LAMP scores or
    diagonal-Fisher saliencies ½FW² of the pruned weights, each layer within ±allocation_range;
    "measured": per block, the knapsack optimum of the loss increases measured by pruning each block
    alone at a few sparsities.
    """

    sparsity: float = 0.5
    pattern: str = "unstructured"
    scope: Literal["row", "layer"] = "row"
    allocation: Literal["uniform", "owl", "dlp", "lamp", "fisher", "measured"] = "uniform"
    allocation_range: float = 0.1
    owl_m: float = 5.0
    targets: tuple[str, ...] = ("*",)
    ignore: tuple[str, ...] = ()
    kind: ClassVar[str] = "prune"
    method: ClassVar[str | None] = None  # the base is no method: recipe.Recipe refuses it
    reads: ClassVar[frozenset[str]] = frozenset()

    @property
    def needs(self) -> set[str]:
        """Input statistics this step reads in the streaming pass (see stats.LinearStats)."""
        return set(self.reads)

    @property
    def needs_data(self) -> bool:
        return bool(self.needs)

    @property
    def n_m(self) -> tuple[int, int] | None:
        if self.pattern == "unstructured":
            return None
        n, m = (int(v) for v in self.pattern.split(":"))
        return n, m

    def validate(self) -> None:
        require(0.0 <= self.sparsity < 1.0, f"prune.sparsity must be in [0, 1), got {self.sparsity}")
        if self.pattern != "unstructured":
            parts = self.pattern.split(":")
            ok = len(parts) == 2 and all(p.strip().isdigit() for p in parts)
            require(ok, f"prune.pattern must be 'unstructured' or 'N:M' like '2:4', got {self.pattern!r}")
            n, m = self.n_m
            require(0 < n < m, f"prune.pattern {self.pattern}: N:M needs 0 < N < M")
            require(abs(self.sparsity - (1 - n / m)) < 1e-9, f"prune.pattern {self.pattern} keeps {n} of {m} "
                    f"weights, so sparsity must be {1 - n / m:g}, got {self.sparsity:g}")
        require(self.allocation == "uniform" or self.pattern == "unstructured",
                f"prune.allocation {self.allocation} needs unstructured sparsity (an N:M pattern fixes every layer's)")
        require(0 < self.allocation_range <= 0.5,
                f"prune.allocation_range must be in (0, 0.5], got {self.allocation_range}")
        require(self.owl_m > 0, f"prune.owl_m must be > 0, got {self.owl_m}")


@dataclass(frozen=True)
class Quantize(Config):
    """What every weight quantizer shares: integer codes for the Linears inside decoder blocks.
    Build a method's class (quantize.Rtn, Awq, gptq.Gptq, nonuniform.LeanQuant, hqq.Hqq).

    group_size: inputs sharing a scale, -1 for one per output row; a last group may be shorter.
    lm_head: also quantize the output head (untied from the input embeddings, which stay as they
    are); GPTQ reads the final norm's outputs, the others round to nearest there.
    act: activation quantization (ActQuant); budget: mixed precision (BitBudget).
    format: "int" (the integer grids above), or one of fpquant.FORMATS (fp8, fp8-block, nvfp4, mxfp4,
    int8), which fixes the element type, the groups and the scales (bits, group_size and sym are then
    unused); act_format: that format's activations (fpquant.ACTS), None for 16-bit ones.
    """

    bits: int = 4
    group_size: int = 128
    sym: bool = True
    lm_head: bool = False
    targets: tuple[str, ...] = ("*",)
    ignore: tuple[str, ...] = ()
    act: ActQuant | None = None
    budget: BitBudget | None = None
    format: str = "int"
    act_format: str | None = None
    kind: ClassVar[str] = "quantize"
    method: ClassVar[str | None] = None
    reads: ClassVar[frozenset[str]] = frozenset()

    @property
    def needs(self) -> set[str]:
        # SmoothQuant's maxima are observed in its own pass (smooth.smoothquant_block_), which
        # needs the block's inputs; static activation scales read the inputs' maxima
        return (set(self.reads) | ({"x_sq"} if self.act is not None and self.act.smooth == "smoothquant" else set())
                | ({"x_absmax"} if self.act_format in STATIC_ACTS else set()))

    @property
    def needs_data(self) -> bool:
        return bool(self.needs)

    @property
    def allocation(self) -> str:
        return "uniform" if self.budget is None else "fisher"

    def validate(self) -> None:
        require(2 <= self.bits <= 8, f"quantize.bits must be in [2, 8], got {self.bits}")
        require(self.format == "int" or self.format in FORMATS,
                f"quantize.format must be int or one of {', '.join(FORMATS)}; got {self.format!r}")
        if self.format != "int":
            require(self.method in ("rtn", "gptq"), f"quantize.format {self.format} takes method rtn or gptq, "
                    f"not {self.method}")
            require(not self.lm_head, f"quantize.format {self.format} covers the decoder blocks' Linears; "
                    "leave lm_head false")
            addons = [k for k in ("outliers", "sparse", "guided", "budget") if getattr(self, k, None) is not None]
            require(not addons, f"quantize.format {self.format} does not combine with {', '.join(addons)}")
            require(self.act is None or (self.act.smooth == "smoothquant" and self.act.bits == 8),
                    "quantize.format takes its activations from act_format; act_bits may only be 8 with "
                    "smooth smoothquant (SmoothQuant before 8-bit activations)")
        if self.budget is not None and self.budget.formats:
            addons = [k for k in ("outliers", "sparse", "guided") if getattr(self, k, None) is not None]
            require(self.method in ("rtn", "gptq") and self.act is None and self.act_format is None and not addons
                    and not self.lm_head, "quantize.format_choices mixes weight formats: method rtn or gptq, "
                    "16-bit activations, no lm_head, no add-ons")
        require(self.format != "int8" or self.act_format == "int8-token",
                "quantize.format int8 is W8A8: set act_format int8-token (for int8 weights alone: format int, bits 8)")
        require(self.act_format is None or self.act_format in ACT_FORMAT,
                f"quantize.act_format must be one of {', '.join(ACT_FORMAT)}; got {self.act_format!r}")
        require(self.act_format is None or ACT_FORMAT[self.act_format] == self.format.removesuffix("-block"),
                f"quantize.act_format {self.act_format} goes with format {ACT_FORMAT.get(self.act_format)}, "
                f"not {self.format}")
        require(self.group_size == -1 or self.group_size >= 1,
                f"quantize.group_size must be >= 1, or -1 for one group per row; got {self.group_size}")
        require(self.budget is None or self.budget.target_bytes is None or not self.lm_head,
                "quantize.target_bytes does not cover lm_head quantization; leave lm_head false")
