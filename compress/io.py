"""Saving and loading compressed models. Output folders are complete or absent.

Quantized Linears are written in the compressed-tensors `pack-quantized` layout (formats.py), with
its `quantization_config` in config.json, so stock transformers (with the compressed-tensors
package) and vLLM load our checkpoints without us; `load` reads them back into QuantLinear, and
also reads what llm-compressor and GPTQ-format tools (AutoGPTQ, GPTQModel) write.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor, nn

from .actquant import ActQuantLinear
from .formats import (
    CUSTOM_TENSORS,
    compressed_tensors_tensors,
    compression_config,
    custom_tensors,
    from_compressed_tensors,
    from_custom_tensors,
    from_gptq_tensors,
    quantization_config,
    target_hit,
)
from .layers import DenseSparseLinear, LowRankLinear, LutLinear, OutlierQuantLinear, QuantLinear, to_linear
from .model import check_finite, check_weight_files, load_model, set_module, source_dtype, weight_matrix
from .outdir import atomic_folder
from .recipe import Recipe, dump_recipe
from .structured import sync_attention_

CUSTOM_LAYERS = (OutlierQuantLinear, DenseSparseLinear, LutLinear)  # our own layouts: compression_config only


def save(model, tokenizer, out_dir: str | Path, *, recipe: Recipe | None = None,
         report: dict | None = None, overwrite: bool = False, dtype: torch.dtype | None = None) -> Path:
    """Write model (safetensors), tokenizer, recipe.yaml and report.json into out_dir.

    Everything is written to a temporary sibling folder first and renamed into place at the end,
    so an interrupted save leaves no folder that looks complete. A model without QuantLinears
    loads with stock `AutoModelForCausalLM.from_pretrained(out_dir)`; one with QuantLinears
    needs the compressed-tensors package installed next to transformers. Unquantized tensors
    (embeddings, norms, biases, Linears left dense) are written in `dtype`, by default
    `storage_dtype(model)`, and config.json records it as HF checkpoints do.
    """
    dtype = dtype or storage_dtype(model)
    with atomic_folder(out_dir, overwrite) as tmp:
        model.save_pretrained(tmp, state_dict=checkpoint_tensors(model, dtype=dtype))
        add_compression_config(model, tmp)
        record_dtype(tmp, dtype)
        write_extras(tmp, tokenizer, recipe, report)
    return Path(out_dir).resolve()


def storage_dtype(model: nn.Module) -> torch.dtype:
    """The precision the model's weights had at the source (`load_model` sets `source_dtype`: the
    safetensors files' float type, 16-bit for a GGUF), else the one it computes in."""
    source = getattr(model, "source_dtype", None)
    return source or next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def checkpoint_tensors(module: nn.Module, prefix: str = "", dtype: torch.dtype | None = None) -> dict[str, Tensor]:
    """The module's state_dict as the checkpoint names it (keys under `prefix`): every QuantLinear's
    buffers are replaced by its compressed-tensors pack-quantized tensors, and the other floating
    tensors are cast to `dtype` when one is given (the compressed ones keep their own dtypes)."""
    join = (lambda n: f"{prefix}.{n}") if prefix else (lambda n: n)
    state = plain_tensors(module) if dtype is None else cast_floats(plain_tensors(module), dtype)
    state = {join(k): v for k, v in state.items()}
    for name, m in module.named_modules():
        if isinstance(m, (*CUSTOM_LAYERS, QuantLinear)):
            tensors = custom_tensors(m) if isinstance(m, CUSTOM_LAYERS) else compressed_tensors_tensors(m)
            state.update({f"{join(name)}.{k}": v for k, v in tensors.items()})
    return state


def cast_floats(state: dict[str, Tensor], dtype: torch.dtype) -> dict[str, Tensor]:
    """The floating tensors of `state` cast to dtype. Tensors that share storage (a tied lm_head and its
    embeddings) stay one tensor, so that saving still recognizes the tie and writes it once."""
    cast: dict[tuple, Tensor] = {}
    out = {}
    for k, v in state.items():
        key = (v.data_ptr(), v.shape, v.stride())
        if v.is_floating_point() and key not in cast:
            cast[key] = v.to(dtype)
        out[k] = cast[key] if v.is_floating_point() else v
    return out


def plain_tensors(module: nn.Module) -> dict[str, Tensor]:
    """The state_dict entries saved as they are: all but the buffers of QuantLinears and of our own
    layouts (OWQ, dense-and-sparse, LeanQuant), whose biases stay."""
    state = dict(module.state_dict())
    for name, m in module.named_modules():
        if isinstance(m, (*CUSTOM_LAYERS, QuantLinear)):
            for k in m.state_dict():
                if k != "bias":
                    del state[f"{name}.{k}" if name else k]
    return state


def round_to_storage_(model: nn.Module, dtype: torch.dtype) -> None:
    """Round the tensors `save` writes as they are to `dtype` in place (kept in their own dtype), so
    that a perplexity measured before saving is the saved checkpoint's."""
    with torch.no_grad():
        for t in plain_tensors(model).values():
            if t.is_floating_point() and t.dtype != dtype:
                t.copy_(t.to(dtype))


def record_dtype(folder: Path, dtype: torch.dtype) -> None:
    """config.json's `dtype`: the one the unquantized tensors are stored in (save_pretrained writes the
    dtype the model computed in)."""
    config = json.loads((folder / "config.json").read_text())
    config["dtype"] = str(dtype).removeprefix("torch.")
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def add_compression_config(model: nn.Module, folder: Path) -> None:
    """Add quantization_config and compression_config to folder/config.json, as the model needs
    them (nothing for a plain model). Reads module types and shapes only: meta tensors will do."""
    quant, lowrank, shapes = quantized_modules(model), lowrank_modules(model), reshaped_linears(model)
    custom = custom_modules(model)
    if quant or lowrank or shapes or custom:
        config = json.loads((folder / "config.json").read_text())
        if quant:
            config["quantization_config"] = quantization_config(quant)
        config["compression_config"] = compression_config(quant, lowrank, shapes, custom)
        (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def write_extras(folder: Path, tokenizer, recipe: Recipe | None, report: dict | None) -> None:
    """The tokenizer, the resolved recipe.yaml and report.json, next to the weights."""
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    if recipe is not None:
        (folder / "recipe.yaml").write_text(dump_recipe(recipe))
    if report is not None:
        (folder / "report.json").write_text(json.dumps(report, indent=2) + "\n")


def quantized_modules(model: nn.Module) -> dict[str, QuantLinear]:
    """The QuantLinears written in the compressed-tensors layout (OWQ's and dense-and-sparse's
    subclasses are not among them)."""
    return {fqn: m for fqn, m in model.named_modules()
            if isinstance(m, QuantLinear) and not isinstance(m, CUSTOM_LAYERS)}


def custom_modules(model: nn.Module) -> dict[str, nn.Module]:
    """OWQ, dense-and-sparse and LeanQuant Linears: layouts of our own, recorded in
    compression_config only."""
    return {fqn: m for fqn, m in model.named_modules() if isinstance(m, CUSTOM_LAYERS)}


def reshaped_linears(model: nn.Module) -> dict[str, tuple[int, int]]:
    """fqn -> (out, in) of every Linear whose shape differs from what the config builds: per-layer
    shapes left by a non-uniform structured removal, which config.json alone cannot state."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        ref = AutoModelForCausalLM.from_config(model.config)
    expected = {fqn: tuple(weight_matrix(m).shape) for fqn, m in ref.named_modules() if isinstance(m, nn.Linear)}
    shapes = {}
    for fqn, m in model.named_modules():
        if fqn in expected and isinstance(m, nn.Linear | QuantLinear):
            shape = (m.out_features, m.in_features)
            if shape != expected[fqn]:
                shapes[fqn] = shape
    return shapes


def lowrank_modules(model: nn.Module) -> dict[str, LowRankLinear]:
    return {fqn: m for fqn, m in model.named_modules() if isinstance(m, LowRankLinear)}


def stock_notes(model: nn.Module) -> list[str]:
    """What a stock runtime (transformers, vLLM) can and cannot take of this model, one line each."""
    lowrank, quant = lowrank_modules(model), quantized_modules(model)
    notes = []
    if lowrank:
        notes.append(f"{len(lowrank)} low-rank Linears (u, v factors): stock transformers and vLLM cannot load them; "
                     "compress.load can, and `compress convert --dense` multiplies them out into plain Linears "
                     "(a stock checkpoint, without the size saving)")
    asym = [f for f, m in quant.items() if not m.spec.sym]
    if asym:
        notes.append(f"{len(asym)} asymmetric quantized Linears: transformers 5.24 with compressed-tensors 0.20 "
                     "fails to load asymmetric pack-quantized checkpoints; compress.load and convert --dense read them")
    custom = custom_modules(model)
    if custom:
        names = {OutlierQuantLinear: "OWQ (float16 outlier columns)",
                 DenseSparseLinear: "dense-and-sparse (float16 single weights)",
                 LutLinear: "LeanQuant (non-uniform codes with lookup tables)"}
        kinds = sorted({next(v for c, v in names.items() if isinstance(m, c)) for m in custom.values()})
        notes.append(f"{len(custom)} {' and '.join(kinds)} Linears: stock transformers and vLLM cannot load them; "
                     "compress.load can, and `compress convert --dense` dequantizes them into plain Linears")
    act = [f for f, m in quant.items() if isinstance(m, ActQuantLinear)]
    if act:
        notes.append(f"{len(act)} Linears quantize their activations in simulation only (fake quant, recorded in "
                     "compression_config): compress.load restores it; stock runtimes load the same weights with "
                     "float activations, and `compress convert --dense` drops it")
    if quant and not asym and not lowrank and not custom:
        notes.append("quantized Linears in compressed-tensors pack-quantized: stock transformers (with the "
                     "compressed-tensors package) and vLLM load this checkpoint")
    shapes = reshaped_linears(model)
    if shapes:
        notes.append(f"{len(shapes)} Linears have per-layer shapes (a non-uniform structured removal) that config.json "
                     "cannot state: stock runtimes cannot load them; compress.load can")
    if not quant and not lowrank and not shapes and not custom:
        notes.append("plain Linears (any removed units are in the config's sizes): stock from_pretrained loads it")
    return notes


def to_dense_(model: nn.Module) -> None:
    """Replace every QuantLinear (OWQ's, dense-and-sparse's and LeanQuant's too) by an nn.Linear holding its
    dequantized weight, and every LowRankLinear by one holding the product of its factors (in place)."""
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    for fqn, m in {**quantized_modules(model), **custom_modules(model)}.items():
        set_module(model, fqn, to_linear(m, dtype))
    for fqn, m in lowrank_modules(model).items():
        lin = nn.Linear(m.in_features, m.out_features, bias=m.u.bias is not None, dtype=dtype,
                        device=m.u.weight.device)
        with torch.no_grad():
            lin.weight.copy_(m.u.weight.float() @ m.v.weight.float())
            if m.u.bias is not None:
                lin.bias.copy_(m.u.bias)
        set_module(model, fqn, lin)


def load(path: str | Path, dtype="float32", *, trust_remote_code: bool = False):
    """Load a model saved by `save`, a quantized checkpoint written by another tool
    (compressed-tensors pack-quantized from llm-compressor; GPTQ format from AutoGPTQ/GPTQModel),
    or any supported plain model: (model, tokenizer).

    Quantized Linears come back as QuantLinear with their packed codes; every tensor in the
    checkpoint must find its place and every parameter must be filled (strict).
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
    method = qc.get("quant_method")
    if method == "compressed-tensors" and qc.get("format") != "pack-quantized":
        raise ValueError(f"{path}: compressed-tensors format {qc.get('format')!r} is not supported "
                         "(pack-quantized is)")
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
    for fqn, entry in ours.items():  # factored and reshaped Linears first: they may be quantized below
        if entry.get("type") == "shape":
            old = model.get_submodule(fqn)
            out_f, in_f = entry["shape"]
            set_module(model, fqn, nn.Linear(in_f, out_f, bias=old.bias is not None, dtype=dtype))
        if entry.get("type") == "lowrank":
            old = model.get_submodule(fqn)
            out_f, in_f = weight_matrix(old).shape
            set_module(model, fqn, LowRankLinear(in_f, out_f, int(entry["rank"]), old.bias is not None, dtype))
    files = check_weight_files(folder)
    model.source_dtype = source_dtype(files)  # what convert writes the unquantized tensors back in
    tensors: dict[str, Tensor] = {}
    for f in files:
        tensors.update(load_file(f))
    gptq = qc["quant_method"] == "gptq"
    marker, names = ("qweight", GPTQ_TENSORS) if gptq else ("weight_packed", CT_TENSORS)
    filled: set[str] = set()
    for fqn, module in list(model.named_modules()):
        if f"{fqn}.{marker}" not in tensors:
            continue
        local = {k[len(fqn) + 1:]: tensors.pop(k) for k in list(tensors) if k.rsplit(".", 1)[0] == fqn}
        kind = ours.get(fqn, {}).get("type")
        extra = set(local) - names - {"bias"} - CUSTOM_TENSORS.get(kind, set())
        if extra:
            raise ValueError(f"{fqn}: unexpected tensors {sorted(extra)}")
        if kind in CUSTOM_TENSORS:  # OWQ, dense-and-sparse, LeanQuant (formats.py): compression_config only
            new = from_custom_tensors(local, ours[fqn], fqn)
        elif gptq:
            v1 = qc.get("checkpoint_format", "gptq") == "gptq"
            new = from_gptq_tensors(local, int(qc["bits"]), int(qc.get("group_size", -1)), v1, fqn)
        else:
            hits = [g for g in qc["config_groups"].values()
                    if target_hit(fqn, module, g.get("targets")) and not target_hit(fqn, module, qc.get("ignore"))]
            if len(hits) != 1:
                raise ValueError(f"{fqn} has packed weights but {len(hits)} quantization config groups target it")
            bias = local.pop("bias", None)
            new = from_compressed_tensors(local, hits[0]["weights"], ours.get(fqn), bias, fqn)
            if (ours.get(fqn) or {}).get("act_bits"):  # simulated activation quantization (actquant.py)
                entry = ours[fqn]
                new = ActQuantLinear.from_quant_linear(new, int(entry["act_bits"]), entry.get("act_smooth", "none"),
                                                       entry.get("act_smooth_tokens"))
        set_module(model, fqn, new)
        filled.update(f"{fqn}.{k}" for k in new.state_dict())
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
GPTQ_TENSORS = {"qweight", "qzeros", "scales", "g_idx"}


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
    rows = []
    for fqn, t in sorted(modules.items()):
        nbytes = sum(v.numel() * v.element_size() for v in t.values())
        kind = ours.get(fqn, {}).get("type")
        if kind in CUSTOM_TENSORS:
            m = from_custom_tensors(t, ours[fqn], fqn)
            rows.append({"module": fqn, "type": kind, "bits": ours[fqn]["bits"], "group": ours[fqn]["group_size"],
                         "sparsity": (m.dequantized_weight() == 0).float().mean().item(), "bytes": nbytes,
                         "fp16_bytes": 2 * (m.out_features * m.in_features + t.get("bias", torch.empty(0)).numel())})
        elif "weight_packed" in t:
            linear = nn.Linear(1, 1, device="meta")  # what compressed-tensors' class targets match
            weights = next((g["weights"] for g in qc.get("config_groups", {}).values()
                            if target_hit(fqn, linear, g.get("targets"))), {})
            local = {k: v for k, v in t.items() if k != "bias"}
            m = from_compressed_tensors(local, weights, ours.get(fqn), None, fqn)
            rows.append({"module": fqn, "type": "quant", "bits": m.spec.bits, "group": m.spec.group_size,
                         "sparsity": (m.dequantized_weight() == 0).float().mean().item(), "bytes": nbytes,
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
