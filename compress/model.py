"""Model glue: loading, the architecture table, and finding the Linears to compress.

The architecture table (ARCHITECTURES, one row per model_type) is the only place that knows where
Hugging Face models keep their decoder blocks, final norm and the Linears that AWQ, structured
removal and rotation rewire.
"""

from __future__ import annotations

import fnmatch
import logging
import math
import re
import struct
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .moe import Experts, unfuse_experts_

log = logging.getLogger(__name__)

Pairs = tuple[tuple[str, tuple[str, ...]], ...]  # ((an op, the Linears that read its output), ...)


@dataclass(frozen=True)
class Architecture:
    """One model_type's row of the architecture table: where its parts are, by attribute path from
    the model (blocks, final_norm) or from a decoder block (the rest). None: that pass refuses it."""

    blocks: str  # the decoder-block ModuleList
    final_norm: str  # the norm applied to the last block's output before the output head
    # AWQ smoothing pairs: (op whose output channels can be scaled down, the Linears that read exactly
    # that output and get their input columns scaled up). Norms must multiply by their weight
    # directly (Gemma's (1 + w) norms are left out on purpose).
    awq_pairs: Pairs | None = None
    # structured removal: the MLP (producers "mlp", consumer "mlp_out") and the attention (query "q",
    # key/value "kv", output "attn_out", the module "attn"), and the norms whose outputs they read
    # ("mlp_norm", "attn_norm": OBSPA's data-free inputs). Only configs with the standard size keys.
    units: dict | None = None
    # rotation (QuaRot): ((norm, the Linears reading its output), ...), (the Linears writing into the
    # residual). Only RMSNorms multiplying by their weight, in blocks that add straight into the
    # residual: LayerNorm (opt, gpt2) subtracts the mean, Gemma's norms multiply by 1 + w and
    # Gemma 2/3 normalize the block outputs before the residual add.
    rotation: tuple[Pairs, tuple[str, ...]] | None = None
    experts: Experts | None = None  # MoE: the fused experts that loading splits into Linears (moe.py)


_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_GATE_UP = ("mlp.gate_proj", "mlp.up_proj")
_LLAMA_UNITS = {"mlp": _GATE_UP, "mlp_out": "mlp.down_proj", "q": "self_attn.q_proj",
                "kv": ("self_attn.k_proj", "self_attn.v_proj"), "attn_out": "self_attn.o_proj", "attn": "self_attn",
                "mlp_norm": "post_attention_layernorm", "attn_norm": "input_layernorm"}
_LLAMA = Architecture(
    "model.layers", "model.norm",
    awq_pairs=(("input_layernorm", _QKV), ("self_attn.v_proj", ("self_attn.o_proj",)),
               ("post_attention_layernorm", _GATE_UP), ("mlp.up_proj", ("mlp.down_proj",))),
    units=_LLAMA_UNITS,
    rotation=((("input_layernorm", _QKV), ("post_attention_layernorm", _GATE_UP)),
              ("self_attn.o_proj", "mlp.down_proj")),
)
_GEMMA = Architecture("model.layers", "model.norm", units=_LLAMA_UNITS)
# Gemma 2 and 3 normalize the attention output (post_attention_layernorm) and the MLP input apart
_GEMMA2 = Architecture("model.layers", "model.norm", units={**_LLAMA_UNITS, "mlp_norm": "pre_feedforward_layernorm"})
_PHI3_READS = (("input_layernorm", ("self_attn.qkv_proj",)), ("post_attention_layernorm", ("mlp.gate_up_proj",)))
_GROUPED = Experts(count="n_routed_experts", groups="n_group")  # GLM-4-MoE, DeepSeek-V3: group-limited routing
_QWEN2_MOE = Experts(routers=("mlp.gate", "mlp.shared_expert_gate"))
_MIXTRAL = Experts(names=("w1", "w3", "w2"))


def _moe_awq(experts: Experts, shared_mlp: str | None = None) -> Pairs:
    """AWQ pairs of an MoE row (smooth.py reads the globs): the norm before the MLP feeds the routers,
    every routed expert's gate and up (one scale vector for all), the shared expert and, in dense
    blocks, the plain MLP; each expert's up feeds its own down."""
    gate, up, down = (f"{experts.path}.*.{n}" for n in experts.names)
    mlps = ("mlp", *((shared_mlp,) if shared_mlp else ()))  # the dense blocks' MLP, the shared expert
    readers = (*experts.routers, gate, up, *(f"{m}.{n}" for m in mlps for n in ("gate_proj", "up_proj")))
    return (("input_layernorm", _QKV), ("self_attn.v_proj", ("self_attn.o_proj",)),
            ("post_attention_layernorm", readers), (up, (down,)),
            *((f"{m}.up_proj", (f"{m}.down_proj",)) for m in mlps))


# model_type -> its row: the only place that knows how Hugging Face models lay out their parts.
ARCHITECTURES: dict[str, Architecture] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    "gemma": _GEMMA,
    "gemma2": _GEMMA2,
    "gemma3_text": _GEMMA2,
    "phi3": Architecture("model.layers", "model.norm", awq_pairs=_PHI3_READS,
                         rotation=(_PHI3_READS, ("self_attn.o_proj", "mlp.down_proj"))),
    "opt": Architecture("model.decoder.layers", "model.decoder.final_layer_norm", awq_pairs=(
        ("self_attn_layer_norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
        ("self_attn.v_proj", ("self_attn.out_proj",)),
        ("final_layer_norm", ("fc1",)),
    )),
    "gpt2": Architecture("transformer.h", "transformer.ln_f",
                         awq_pairs=(("ln_1", ("attn.c_attn",)), ("ln_2", ("mlp.c_fc",)))),
    # MoE: per-expert Linears after loading; no structured units or rotation across routed experts yet
    "qwen2_moe": Architecture("model.layers", "model.norm", experts=_QWEN2_MOE,
                              awq_pairs=_moe_awq(_QWEN2_MOE, shared_mlp="mlp.shared_expert")),
    "qwen3_moe": Architecture("model.layers", "model.norm", experts=Experts(), awq_pairs=_moe_awq(Experts())),
    "mixtral": Architecture("model.layers", "model.norm", experts=_MIXTRAL, awq_pairs=_moe_awq(_MIXTRAL)),
    # first_k_dense_replace dense blocks, then routed experts beside a shared_experts MLP; the router
    # (mlp.gate) is no Linear and reads fp32 weights and e_score_correction_bias. DeepSeek-V3's MLA
    # attention (q_a_proj, q_b_proj or q_proj, kv_a_proj_with_mqa, kv_b_proj, o_proj) is plain Linears
    "glm4_moe": Architecture("model.layers", "model.norm", experts=_GROUPED,
                             awq_pairs=_moe_awq(_GROUPED, shared_mlp="mlp.shared_experts")),
    "deepseek_v3": Architecture("model.layers", "model.norm", experts=_GROUPED),
}


def architecture(model: nn.Module) -> Architecture:
    """The model's row of the architecture table (ValueError for an unsupported model_type)."""
    check_supported(model.config.model_type)
    return ARCHITECTURES[model.config.model_type]


def layout(model: nn.Module, part: str, needed_by: str | None = None):
    """One part of the model's row ("awq_pairs", "units", "rotation"); None where the row lacks it
    or the model_type has no row, or, given `needed_by` (the pass that needs it), a ValueError
    naming the model types that have it."""
    row = ARCHITECTURES.get(model.config.model_type)
    found = None if row is None else getattr(row, part)
    if found is None and needed_by is not None:
        raise ValueError(f"{needed_by} does not support model_type {model.config.model_type!r}; "
                         f"it supports: {', '.join(supporting(part))}")
    return found


def supporting(part: str) -> list[str]:
    """The model types whose row has `part`, sorted: for the messages of the passes that need it."""
    return sorted(t for t, row in ARCHITECTURES.items() if getattr(row, part) is not None)


def awq_pairs(model: nn.Module) -> Pairs:
    return layout(model, "awq_pairs", "awq (its smoothing pairs)")


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def load_model(
    path: str | Path,
    dtype: torch.dtype | str = torch.float32,
    *,
    trust_remote_code: bool = False,
):
    """Load a causal LM and its tokenizer from a folder, a hub id or a .gguf file.

    A GGUF file is dequantized by transformers (needs the `gguf` package) into a plain model.
    Weights are read from safetensors only (or GGUF): never unpickled. Raises ValueError for an
    unsupported architecture (before any weights are read), pickle-only or corrupt weight files,
    and NaN or inf weights.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    source, kwargs = _resolve(str(path))
    kwargs["trust_remote_code"] = trust_remote_code
    gguf = "gguf_file" in kwargs
    try:
        config = AutoConfig.from_pretrained(source, **kwargs)
    except OSError as e:
        raise FileNotFoundError(f"cannot load a model config from {path}: {_first_line(e)}") from None
    except (ValueError, struct.error) as e:
        raise (_gguf_error(Path(path), e) if gguf else e) from None
    check_supported(config.model_type)
    safe = {} if gguf else {"use_safetensors": True}
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **safe, **kwargs)
    except OSError as e:  # a hub id without safetensors weights, or offline
        raise FileNotFoundError(f"cannot load safetensors weights from {path}: {_first_line(e)}") from None
    except (ValueError, struct.error) as e:
        raise (_gguf_error(Path(path), e) if gguf else e) from None
    check_finite(model.state_dict().items(), str(path))
    unfuse_experts(model)
    tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    if gguf:
        _forget_gguf(model)
    if gguf:  # its unquantized tensors are F16 or F32 and the rest integer codes: keep 16 bits
        model.source_dtype = torch.float16
    elif Path(source).is_dir():
        model.source_dtype = source_dtype(sorted(Path(source).glob("*.safetensors")))
    else:  # a hub id: the files are in the hub's cache, not at hand
        model.source_dtype = _config_dtype(config)
    model.eval()
    return model, tokenizer


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def source_dtype(files: Iterable[Path]) -> torch.dtype | None:
    """The float dtype that holds most `*.weight` tensors of these safetensors files (by element count): what
    `save` writes unquantized tensors in (`model.source_dtype`), so that a bfloat16 model is not saved
    in float32 because it was computed in float32. None when no tensor is a float."""
    from safetensors import safe_open

    counts: dict[torch.dtype, int] = {}
    for file in files:
        with safe_open(file, "pt") as f:
            for name in f.keys():
                if not name.endswith(".weight"):  # quantization scales and the like have their own dtypes
                    continue
                piece = f.get_slice(name)
                dtype = SAFETENSORS_DTYPES.get(piece.get_dtype())
                if dtype is not None:
                    counts[dtype] = counts.get(dtype, 0) + math.prod(piece.get_shape())
    return max(counts, key=counts.get) if counts else None


def _config_dtype(config) -> torch.dtype | None:
    """The float dtype a model's config records, if any."""
    dtype = getattr(config, "dtype", None)
    dtype = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else None


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def check_weight_files(folder: Path) -> list[Path]:
    """The folder's .safetensors files, each with a readable header. A folder with only pickle
    weights (pytorch_model.bin) is refused: unpickling a file can run any code it carries."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        pickles = sorted(f.name for f in folder.iterdir() if f.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise ValueError(f"{folder} has only pickle weights ({', '.join(pickles)}); compress reads safetensors "
                             "only, because unpickling can run code: convert them with a tool you trust")
        raise FileNotFoundError(f"{folder} has no .safetensors weights")
    for f in files:
        check_safetensors(f)
    return files


def check_safetensors(path: Path) -> None:
    """Read a safetensors header, so that a truncated or corrupt file fails here, named, rather
    than deep inside a loader. (The tensor bytes carry no checksum; check_finite catches some.)"""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, "pt") as f:
            f.keys()
    except SafetensorError as e:
        raise ValueError(f"{path} is truncated or not a safetensors file ({_first_line(e)})") from None


def _gguf_error(path: Path, e: Exception) -> Exception:
    """transformers meets a truncated or corrupt GGUF with a bare struct.error or a failed reshape of
    its tensor data: when gguf's own reader cannot read the file either, say so, naming it; else e."""
    from gguf import GGUFReader

    try:
        GGUFReader(path)
        return e
    except (ValueError, struct.error, KeyError, IndexError) as bad:
        with open(path, "rb") as f:
            magic = f.read(4)
        why = "it does not start with the GGUF magic" if magic != b"GGUF" else f"gguf's reader: {_first_line(bad)}"
        return ValueError(f"{path} is truncated or not a GGUF file ({why})")


def check_finite(tensors: Iterable[tuple[str, torch.Tensor]], source: str) -> None:
    """Refuse NaN or inf weights: calibration would spread them through every later block."""
    for name, t in tensors:
        if not t.is_floating_point() or t.device.type == "meta":
            continue
        wide = (lambda c: c.float()) if t.element_size() == 1 else (lambda c: c)  # float8 has no isfinite
        if not all(torch.isfinite(wide(chunk)).all() for chunk in t.detach().reshape(-1).split(1 << 24)):
            bad = int((~torch.isfinite(wide(t))).sum())
            raise ValueError(f"{source}: {name} has {bad} NaN or inf values; refusing a model with non-finite weights")


def _resolve(path: str) -> tuple[str, dict]:
    p = Path(path)
    if p.suffix == ".gguf":
        if not p.is_file():
            raise FileNotFoundError(f"model file not found: {path}")
        _need_gguf()
        return str(p.parent), {"gguf_file": p.name}
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise FileNotFoundError(f"{path} is a folder without config.json: not a Hugging Face model")
        check_weight_files(p)
        return str(p), {}
    if p.exists() or path.startswith((".", "/", "~")) or path.count("/") != 1:
        raise FileNotFoundError(f"model not found: {path} (a folder, a .gguf file or a hub id org/name)")
    return path, {}  # a hub id


def _need_gguf() -> None:
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise ValueError("reading a .gguf model needs the gguf package: pip install gguf") from None


def _forget_gguf(model) -> None:
    """A dequantized GGUF model is an ordinary dense model; drop the loader's quantizer so it saves."""
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def check_supported(model_type: str) -> None:
    if model_type not in ARCHITECTURES:
        raise ValueError(
            f"unsupported model_type {model_type!r}; supported: {', '.join(sorted(ARCHITECTURES))}"
        )


@contextmanager
def frozen(model: nn.Module) -> Iterator[nn.Module]:
    """Inside: every parameter without requires_grad (a pass turns on only what it trains or scores)
    and the model in eval mode (no dropout); on exit, both as they were."""
    flags = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    try:
        yield model
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
        model.train(was_training)


def blocks_path(model: nn.Module) -> str:
    return architecture(model).blocks


def final_norm(model: nn.Module) -> nn.Module:
    """The norm applied to the last block's output before the output head."""
    return model.get_submodule(architecture(model).final_norm)


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The ModuleList of decoder blocks, from the architecture table."""
    return model.get_submodule(blocks_path(model))


def is_linear(module: nn.Module) -> bool:
    """nn.Linear, or transformers' Conv1D (GPT-2), which stores its weight transposed."""
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def find_linears(module: nn.Module, prefix: str = "") -> dict[str, nn.Module]:
    """Every Linear-like module below `module`, keyed by fully-qualified name."""
    join = (lambda n: f"{prefix}.{n}") if prefix else (lambda n: n)
    return {join(name): m for name, m in module.named_modules() if name and is_linear(m)}


def weight_matrix(linear: nn.Module) -> torch.Tensor:
    """The weight as [out, in] (a view, transposed for Conv1D)."""
    return linear.weight.t() if type(linear).__name__ == "Conv1D" else linear.weight


def set_weight_matrix_(linear: nn.Module, W: torch.Tensor) -> None:
    """Write an [out, in] matrix into the module, in its own dtype and layout."""
    with torch.no_grad():
        weight_matrix(linear).copy_(W.to(linear.weight.dtype))


def set_module(root: nn.Module, fqn: str, new: nn.Module) -> None:
    """Replace the submodule named fqn."""
    parent, _, name = fqn.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, new)


def match(fqn: str, targets: Sequence[str], ignore: Sequence[str]) -> bool:
    """fnmatch globs on the module name: in some target and in no ignore pattern."""
    hit = lambda patterns: any(fnmatch.fnmatchcase(fqn, p) for p in patterns)  # noqa: E731
    return hit(targets) and not hit(ignore)


def block_linears(model: nn.Module, index: int) -> dict[str, nn.Module]:
    """The Linears of one decoder block that compression may act on: all but an MoE's routers
    (tiny, and a changed router picks other experts), whatever the recipe's targets."""
    prefix, experts = f"{blocks_path(model)}.{index}", architecture(model).experts
    routers = {f"{prefix}.{r}" for r in experts.routers} if experts else set()
    return {f: m for f, m in find_linears(decoder_blocks(model)[index], prefix).items() if f not in routers}


def unfuse_experts(model: nn.Module) -> None:
    """Split an MoE model's fused experts into per-expert Linears, in place (moe.py); others: nothing."""
    experts = ARCHITECTURES[model.config.model_type].experts
    if experts is not None:
        unfuse_experts_(decoder_blocks(model), experts)


def fp32_tensors(model: nn.Module) -> re.Pattern | None:
    """The tensor names transformers keeps in float32 whatever the model's dtype
    (`_keep_in_fp32_modules_strict`, matched as its loader matches them: DeepSeek-V3's and GLM-4-MoE's
    router weight and e_score_correction_bias); None for a model without them. Saving and streaming
    keep them in float32 too, as stock save_pretrained does: the load-balancing bias rounded to 16
    bits would move routing choices."""
    patterns = getattr(model, "_keep_in_fp32_modules_strict", None)
    return re.compile("|".join(p.replace("*", ".*") for p in sorted(patterns))) if patterns else None


def max_length(model: nn.Module) -> int | None:
    """The longest sequence the model takes (max_position_embeddings or n_positions)."""
    config = model.config
    for key in ("max_position_embeddings", "n_positions"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """Logical parameter counts: "total" (every parameter; a quantized Linear counts in·out), and
    "block_linears" (the weights of the Linears inside decoder blocks, where compression acts)."""
    def in_buffers(m: nn.Module) -> bool:  # QuantLinear, BitmaskLinear, FloatLinear: their weights are buffers
        return any(name in m._buffers for name in ("weight_packed", "bitmask", "weight"))

    def size(m: nn.Module) -> int:
        if is_linear(m):
            return m.weight.numel()
        return m.in_features * m.out_features if in_buffers(m) else 0

    packed = sum(size(m) for m in model.modules() if in_buffers(m))
    return {"total": sum(p.numel() for p in model.parameters()) + packed,
            "block_linears": sum(size(m) for m in decoder_blocks(model).modules())}
