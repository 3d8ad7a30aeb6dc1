"""Reading checkpoints. `load` builds a model from what `save` (saving.py) writes, or from a
quantized or sparse checkpoint of another tool: compressed-tensors (pack-quantized, sparse-bitmask and
float formats) from llm-compressor, GPTQ format from AutoGPTQ and GPTQModel. `describe` tables a
checkpoint's modules (type, bits, sparsity, bytes) from its tensors alone, for `compress inspect`.

Every compressed Linear rebuilds itself from its own tensors and compression_config entry
(layers.FORMATS, the CompressedLinear protocol); nothing here knows one class from another.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor, nn

from .formats import from_compressed_tensors, from_gptq_tensors, target_hit
from .fplinear import CT_FORMAT, FloatLinear, ct_scheme_format
from .fpquant import FORMATS as FORMATS_FP
from .layers import BitmaskLinear, format_of
from .model import check_finite, check_weight_files, load_model, set_module, source_dtype, unfuse_experts
from .saving import own_tensors
from .structured import sync_attention_


def load(path: str | Path, dtype="float32", *, trust_remote_code: bool = False):
    """Load a model saved by `save`, a quantized or sparse checkpoint written by another tool
    (compressed-tensors pack-quantized or sparse-bitmask from llm-compressor; GPTQ format from
    AutoGPTQ/GPTQModel), or any supported plain model: (model, tokenizer).

    Quantized Linears come back as QuantLinear with their packed codes, sparse-bitmask ones as
    BitmaskLinear; every tensor in the checkpoint must find its place and every parameter must be
    filled (strict).
    """
    folder = Path(path)
    config_file = folder / "config.json"
    try:
        raw = json.loads(config_file.read_text()) if config_file.is_file() else {}
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_file} is not valid JSON ({e})") from None
    qc, ours = raw.get("quantization_config"), raw.get("compression_config")
    if not qc and not ours:
        return load_model(path, dtype, trust_remote_code=trust_remote_code)
    if not qc:
        return _load_quantized(folder, {"quant_method": "compressed-tensors", "config_groups": {}}, dtype)
    method, sparse = qc.get("quant_method"), (qc.get("sparsity_config") or {}).get("format", "dense")
    formats = {qc.get("format")} | {g.get("format") for g in (qc.get("config_groups") or {}).values()} - {None}
    if method == "compressed-tensors" and qc.get("config_groups") and formats - CT_READ:
        raise ValueError(f"{path}: compressed-tensors format {sorted(formats - CT_READ)[0]!r} is not supported "
                         f"({', '.join(sorted(CT_READ - {'mixed-precision'}))} are)")
    if method == "compressed-tensors" and sparse not in ("dense", "sparse-bitmask"):
        raise ValueError(f"{path}: compressed-tensors sparsity format {sparse!r} is not supported "
                         "(sparse-bitmask and dense are)")
    if method not in ("compressed-tensors", "gptq"):
        raise ValueError(f"{path}: quant_method {method!r} is not supported "
                         "(compressed-tensors pack-quantized and gptq are)")
    return _load_quantized(folder, qc, dtype)


def _load_quantized(folder: Path, qc: dict, dtype):
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from .model import DTYPES, check_supported

    dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    config = AutoConfig.from_pretrained(folder)
    check_supported(config.model_type)
    ours = json.loads((folder / "config.json").read_text()).get("compression_config", {}).get("modules", {})
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the modules carry it now; save() writes it anew
    if hasattr(config, "compression_config"):
        del config.compression_config
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    unfuse_experts(model)  # an MoE's per-expert tensors fill per-expert Linears
    files = check_weight_files(folder)
    model.source_dtype = source_dtype(files)  # what convert writes the unquantized tensors back in
    grouped: dict[str, dict[str, Tensor]] = {}  # module name -> its tensors, module-local names
    for f in files:
        for key, value in load_file(f).items():
            fqn, _, name = key.rpartition(".")
            grouped.setdefault(fqn, {})[name] = value
    _regroup_bitmask(grouped)
    filled: set[str] = set()

    def put(fqn: str, new: nn.Module) -> None:
        set_module(model, fqn, new)
        filled.update(f"{fqn}.{k}" for k in own_tensors(new))

    for fqn in sorted(ours, key=lambda f: f.count(".")):  # a low-rank Linear before its (quantized) factors
        entry, cls = ours[fqn], format_of(ours[fqn])
        if entry.get("type") != "shape" and cls is None:
            continue
        try:
            like = model.get_submodule(fqn)
        except AttributeError:
            raise ValueError(f"compression_config names {fqn}, which a {config.model_type} model lacks") from None
        if cls is None:  # a plain Linear of its own shape (a non-uniform structured removal)
            out_f, in_f = entry["shape"]
            set_module(model, fqn, nn.Linear(in_f, out_f, bias=like.bias is not None, dtype=dtype))
        else:
            put(fqn, cls.from_tensors(grouped.pop(fqn, {}), entry, fqn, like))
    gptq = qc["quant_method"] == "gptq"
    marker, names = ("qweight", GPTQ_TENSORS) if gptq else ("weight_scale", CT_TENSORS)
    for fqn, module in list(model.named_modules()):  # other tools' quantized and sparse Linears
        local = grouped.get(fqn, {})
        if "bitmask" in local:  # compressed-tensors sparse-bitmask, from llm-compressor
            del grouped[fqn]
            extra = set(local) - BITMASK_TENSORS - {"bias"}
            if extra:
                raise ValueError(f"{fqn}: sparse-bitmask over quantized weights ({sorted(extra)}) is not supported")
            put(fqn, BitmaskLinear.from_tensors(local, {"type": BitmaskLinear.kind}, fqn, module))
            continue
        if marker not in local:
            continue
        del grouped[fqn]
        if gptq:
            v1 = qc.get("checkpoint_format", "gptq") == "gptq"
            put(fqn, from_gptq_tensors(local, int(qc["bits"]), int(qc.get("group_size", -1)), v1, fqn))
            continue
        hits = [g for g in qc["config_groups"].values()
                if target_hit(fqn, module, g.get("targets")) and not target_hit(fqn, module, qc.get("ignore"))]
        if len(hits) != 1:
            raise ValueError(f"{fqn} has quantized weights but {len(hits)} quantization config groups target it")
        if hits[0].get("format", qc.get("format")) != "pack-quantized":
            fmt, act = ct_scheme_format(hits[0].get("weights"), hits[0].get("input_activations"), fqn)
            put(fqn, FloatLinear.from_tensors(local, {"format": fmt, "act": act}, fqn, module))
            continue
        extra = set(local) - names - {"bias"}
        if extra:
            raise ValueError(f"{fqn}: unexpected tensors {sorted(extra)}")
        put(fqn, from_compressed_tensors(local, hits[0]["weights"], fqn))
    tensors = {f"{fqn}.{k}" if fqn else k: v for fqn, local in grouped.items() for k, v in local.items()}
    result = model.load_state_dict(tensors, strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    missing = set(result.missing_keys) - tied - filled
    if missing or result.unexpected_keys:
        raise ValueError(f"checkpoint does not match the model: missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(result.unexpected_keys)[:5]}")
    model.tie_weights()
    sync_attention_(model)
    check_finite(model.state_dict().items(), str(folder))
    model.eval()
    return model, AutoTokenizer.from_pretrained(folder)


CT_TENSORS = {"weight_packed", "weight_scale", "weight_zero_point", "weight_shape"}
CT_READ = {"pack-quantized", "mixed-precision", *CT_FORMAT.values()}  # compressed-tensors formats load reads
GPTQ_TENSORS = {"qweight", "qzeros", "scales", "g_idx"}
BITMASK_TENSORS = {"shape", "compressed", "bitmask", "row_offsets"}


def _regroup_bitmask(grouped: dict[str, dict[str, Tensor]]) -> None:
    """Older compressed-tensors named a sparse-bitmask weight's tensors {module}.weight.bitmask, later
    ones {module}.bitmask (as we do): file the older under their module (in place)."""
    for fqn in [f for f, local in grouped.items() if f.endswith(".weight") and "bitmask" in local]:
        grouped.setdefault(fqn.removesuffix(".weight"), {}).update(grouped.pop(fqn))


def describe(path: str | Path) -> list[dict]:
    """One row per module with weights in a checkpoint folder: type, bits, group, sparsity, bytes
    on disk and the bytes the same weights take in float16. Reads tensors, builds no model."""
    from safetensors import safe_open

    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a checkpoint folder (no config.json)")
    config = json.loads((folder / "config.json").read_text())
    qc = config.get("quantization_config") or {}
    ours = config.get("compression_config", {}).get("modules", {})
    files = check_weight_files(folder)
    modules: dict[str, dict[str, Tensor]] = {}
    for f in files:
        with safe_open(f, "pt") as st:
            for key in st.keys():
                fqn, _, name = key.rpartition(".")
                modules.setdefault(fqn, {})[name] = st.get_tensor(key)
    _regroup_bitmask(modules)
    rows = []
    for fqn, t in sorted(modules.items()):
        nbytes = sum(v.numel() * v.element_size() for v in t.values())
        entry, cls = ours.get(fqn), format_of(ours.get(fqn))
        other = None  # (format, act) of another tool's float-quantized module
        if cls is not None or "weight_packed" in t or "bitmask" in t or "weight_scale" in t:  # ours, or another tool's
            if cls is not None:
                m = cls.from_tensors(t, entry, fqn)
            elif "bitmask" in t:
                m = BitmaskLinear.from_tensors(t, {"type": BitmaskLinear.kind}, fqn)
                entry = m.entry()
            else:
                linear = nn.Linear(1, 1, device="meta")  # what compressed-tensors' class targets match
                group = next((g for g in qc.get("config_groups", {}).values()
                              if target_hit(fqn, linear, g.get("targets"))), {})
                if group.get("format", qc.get("format")) not in (None, "pack-quantized"):
                    other = ct_scheme_format(group.get("weights"), group.get("input_activations"), fqn)
                    m = FloatLinear.from_tensors(t, {"format": other[0], "act": other[1]}, fqn)
                else:
                    m = from_compressed_tensors({k: v for k, v in t.items() if k != "bias"}, group.get("weights", {}),
                                                fqn)
                entry = m.entry()
            if isinstance(m, FloatLinear):  # named by its format; bits of its elements, its scale group
                entry = {"type": m.fmt, "bits": m.format.element_bits, "group_size": m.format.group}
            elif other is not None:
                entry = {"type": other[0], "bits": FORMATS_FP[other[0]].element_bits,
                         "group_size": FORMATS_FP[other[0]].group}
            rows.append({"module": fqn, "type": entry["type"], "bits": entry.get("bits"),
                         "group": entry.get("group_size"), "sparsity": (m.dense_weight() == 0).float().mean().item(),
                         "bytes": nbytes,
                         "fp16_bytes": 2 * (m.out_features * m.in_features + t.get("bias", torch.empty(0)).numel())})
        elif "weight" in t and t["weight"].dim() == 2:
            w = t["weight"]
            rows.append({"module": fqn, "type": "dense", "bits": 8 * w.element_size(), "group": None,
                         "sparsity": (w == 0).float().mean().item(), "bytes": nbytes,
                         "fp16_bytes": 2 * sum(v.numel() for v in t.values())})
        else:
            rows.append({"module": fqn, "type": "other", "bits": None, "group": None, "sparsity": None,
                         "bytes": nbytes, "fp16_bytes": 2 * sum(v.numel() for v in t.values())})
    return rows
