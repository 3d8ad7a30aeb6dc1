"""Saving and loading compressed models. Output folders are complete or absent.

Quantized Linears are written in the compressed-tensors `pack-quantized` layout, with its
`quantization_config` in config.json, so stock transformers (with the compressed-tensors package)
and vLLM load our checkpoints without us. Per module:

    {fqn}.weight_packed      int32 [out, ceil(in·bits/32)]   compress.pack layout
    {fqn}.weight_scale       float16 [out, n_groups]
    {fqn}.weight_zero_point  int32 [ceil(out·bits/32), n_groups], signed zeros packed along the
                             output dim (asymmetric grids only)
    {fqn}.weight_shape       int64 [2]

compressed-tensors needs in % group_size == 0. A layer with a ragged last group (576 inputs at
group 128) is written exactly at the largest group size that divides both (64), each scale
repeated; our own `compression_config` records the true group size, so `load` gets it back.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from torch import Tensor, nn

from .layers import QuantLinear, to_linear
from .model import load_model, set_module
from .pack import pack_codes, unpack_codes
from .quantize import QuantSpec
from .recipe import Recipe, dump_recipe

FORMAT_VERSION = 1


def check_output_dir(out_dir: str | Path, overwrite: bool = False) -> Path:
    """Refuse a non-empty output folder unless overwrite; refuse a path that is a file."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"--out {out} is not empty (pass --overwrite to replace it)")
    return out


def save(model, tokenizer, out_dir: str | Path, *, recipe: Recipe | None = None,
         report: dict | None = None, overwrite: bool = False) -> Path:
    """Write model (safetensors), tokenizer, recipe.yaml and report.json into out_dir.

    Everything is written to a temporary sibling folder first and renamed into place at the end,
    so an interrupted save leaves no folder that looks complete. A model without QuantLinears
    loads with stock `AutoModelForCausalLM.from_pretrained(out_dir)`; one with QuantLinears
    needs the compressed-tensors package installed next to transformers.
    """
    out = check_output_dir(out_dir, overwrite).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        quant = quantized_modules(model)
        state = model.state_dict()
        for fqn, m in quant.items():
            for name in list(m.state_dict()):
                if name != "bias":
                    del state[f"{fqn}.{name}"]
            state.update({f"{fqn}.{k}": v for k, v in compressed_tensors_tensors(m).items()})
        model.save_pretrained(tmp, state_dict=state)
        if quant:
            config = json.loads((tmp / "config.json").read_text())
            config["quantization_config"] = quantization_config(quant)
            config["compression_config"] = compression_config(quant)
            (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if recipe is not None:
            (tmp / "recipe.yaml").write_text(dump_recipe(recipe))
        if report is not None:
            (tmp / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        if out.exists():
            trash = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(trash)
            tmp.rename(out)
            shutil.rmtree(trash)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def quantized_modules(model: nn.Module) -> dict[str, QuantLinear]:
    return {fqn: m for fqn, m in model.named_modules() if isinstance(m, QuantLinear)}


def to_dense_(model: nn.Module) -> None:
    """Replace every QuantLinear by an nn.Linear holding its dequantized weight (in place)."""
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    for fqn, m in quantized_modules(model).items():
        set_module(model, fqn, to_linear(m, dtype))


# ---- compressed-tensors layout ---------------------------------------------------------------

def _stored_group(m: QuantLinear) -> int:
    """The group size written to disk: -1 per row, else one that divides in_features."""
    g = m.spec.group(m.in_features)
    if g >= m.in_features:
        return -1
    return g if m.in_features % g == 0 else math.gcd(g, m.in_features)


def compressed_tensors_tensors(m: QuantLinear) -> dict[str, Tensor]:
    """The module's tensors in the pack-quantized layout (module-local names)."""
    g, stored = m.spec.group(m.in_features), _stored_group(m)
    repeat = 1 if stored == -1 else g // stored
    scale = m.weight_scale.repeat_interleave(repeat, dim=1)[:, : -(-m.in_features // stored) if stored != -1 else 1]
    tensors = {
        "weight_packed": m.weight_packed,
        "weight_scale": scale.contiguous(),
        "weight_shape": torch.tensor([m.out_features, m.in_features], dtype=torch.int64),
    }
    if not m.spec.sym:
        zero = m.weight_zero_point.repeat_interleave(repeat, dim=1)[:, : scale.shape[1]]
        tensors["weight_zero_point"] = pack_codes(zero.t().contiguous(), m.spec.bits).t().contiguous()
    return tensors


def quantization_config(quant: dict[str, QuantLinear]) -> dict:
    """config.json's quantization_config: one config group per distinct stored scheme."""
    groups: dict[tuple, list[str]] = {}
    for fqn, m in quant.items():
        groups.setdefault((m.spec.bits, _stored_group(m), m.spec.sym), []).append(fqn)
    config_groups = {}
    for i, ((bits, g, sym), names) in enumerate(sorted(groups.items())):
        weights = {"num_bits": bits, "type": "int", "symmetric": sym, "dynamic": False,
                   "strategy": "channel" if g == -1 else "group", "group_size": None if g == -1 else g}
        config_groups[f"group_{i}"] = {"targets": sorted(names), "weights": weights,
                                       "input_activations": None, "output_activations": None}
    return {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
            "config_groups": config_groups, "ignore": [], "kv_cache_scheme": None,
            "global_compression_ratio": None}


def compression_config(quant: dict[str, QuantLinear]) -> dict:
    """Our own record, exact where the compressed-tensors config is not (ragged groups)."""
    from . import __version__

    modules = {fqn: {"type": "quant", "bits": m.spec.bits, "group_size": m.spec.group_size, "sym": m.spec.sym}
               for fqn, m in quant.items()}
    return {"format_version": FORMAT_VERSION, "producer": f"compress {__version__}", "modules": modules}


def _from_compressed_tensors(t: dict[str, Tensor], weights: dict, ours: dict | None, bias: Tensor | None,
                             fqn: str) -> QuantLinear:
    """A QuantLinear from one module's pack-quantized tensors and its config group's weights args."""
    if weights.get("type", "int") != "int" or weights.get("strategy") not in ("group", "channel"):
        raise ValueError(f"{fqn}: only int weights with group or channel strategy are supported, got {weights}")
    bits, sym = int(weights["num_bits"]), bool(weights.get("symmetric", True))
    out, cols = (int(v) for v in t["weight_shape"].tolist())
    stored = -1 if weights["strategy"] == "channel" else int(weights["group_size"])
    group = int(ours["group_size"]) if ours else stored
    spec = QuantSpec(bits, group, sym)
    step = 1 if stored == -1 or group == -1 else group // stored
    scale = t["weight_scale"][:, ::step] if group != -1 else t["weight_scale"][:, :1]
    if sym:
        zero = torch.full(scale.shape, 2 ** (bits - 1), dtype=torch.uint8)
    else:
        zp = t["weight_zero_point"]
        if zp.dtype == torch.int32:  # packed along the output dim
            zero = unpack_codes(zp.t().contiguous(), bits, out).t()
        else:  # unpacked signed zeros (older writers)
            zero = (zp.to(torch.int16) + 2 ** (bits - 1)).to(torch.uint8)
        zero = zero[:, ::step].contiguous() if group != -1 else zero[:, :1].contiguous()
    m = QuantLinear(cols, out, spec, bias is not None, bias.dtype if bias is not None else torch.float32,
                    scale_dtype=scale.dtype)
    if tuple(t["weight_packed"].shape) != tuple(m.weight_packed.shape) or scale.shape != m.weight_scale.shape:
        raise ValueError(f"{fqn}: tensor shapes do not match a {bits}-bit [{out}, {cols}] layer")
    m.weight_packed.copy_(t["weight_packed"])
    m.weight_scale.copy_(scale)
    m.weight_zero_point.copy_(zero)
    if bias is not None:
        m.bias.data.copy_(bias)
    return m


def _target_hit(fqn: str, module: nn.Module, patterns) -> bool:
    """compressed-tensors' matching: an exact name, "re:<regex>" on the name, or a class name."""
    for p in patterns or ():
        if p.startswith("re:"):
            if re.match(p[3:], fqn):
                return True
        elif p == fqn or any(c.__name__ == p for c in type(module).__mro__):
            return True
    return False


# ---- loading -----------------------------------------------------------------------------------

def load(path: str | Path, dtype="float32", *, trust_remote_code: bool = False):
    """Load a model saved by `save`, a compressed-tensors pack-quantized checkpoint written by
    another tool (llm-compressor), or any supported plain model: (model, tokenizer).

    Quantized Linears come back as QuantLinear with their packed codes; every tensor in the
    checkpoint must find its place and every parameter must be filled (strict).
    """
    folder = Path(path)
    config_file = folder / "config.json"
    qc = json.loads(config_file.read_text()).get("quantization_config") if config_file.is_file() else None
    if not qc:
        return load_model(path, dtype, trust_remote_code=trust_remote_code)
    if qc.get("quant_method") != "compressed-tensors":
        raise ValueError(f"{path}: quant_method {qc.get('quant_method')!r} is not supported "
                         "(compressed-tensors pack-quantized is)")
    if qc.get("format") != "pack-quantized":
        raise ValueError(f"{path}: compressed-tensors format {qc.get('format')!r} is not supported "
                         "(pack-quantized is)")
    return _load_pack_quantized(folder, qc, dtype)


def _load_pack_quantized(folder: Path, qc: dict, dtype):
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from .model import DTYPES, check_supported

    dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    config = AutoConfig.from_pretrained(folder)
    check_supported(config.model_type)
    ours = json.loads((folder / "config.json").read_text()).get("compression_config", {}).get("modules", {})
    del config.quantization_config  # the modules carry it now; save() writes it anew
    if hasattr(config, "compression_config"):
        del config.compression_config
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder} has no .safetensors files")
    tensors: dict[str, Tensor] = {}
    for f in files:
        tensors.update(load_file(f))
    filled: set[str] = set()
    for fqn, module in list(model.named_modules()):
        if f"{fqn}.weight_packed" not in tensors:
            continue
        hits = [g for g in qc["config_groups"].values()
                if _target_hit(fqn, module, g.get("targets")) and not _target_hit(fqn, module, qc.get("ignore"))]
        if len(hits) != 1:
            raise ValueError(f"{fqn} has packed weights but {len(hits)} quantization config groups target it")
        local = {k[len(fqn) + 1:]: tensors.pop(k) for k in list(tensors) if k.rsplit(".", 1)[0] == fqn}
        bias = local.pop("bias", None)
        extra = set(local) - {"weight_packed", "weight_scale", "weight_zero_point", "weight_shape"}
        if extra:
            raise ValueError(f"{fqn}: unexpected tensors {sorted(extra)}")
        new = _from_compressed_tensors(local, hits[0]["weights"], ours.get(fqn), bias, fqn)
        set_module(model, fqn, new)
        filled.update(f"{fqn}.{k}" for k in new.state_dict())
    result = model.load_state_dict(tensors, strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    missing = set(result.missing_keys) - tied - filled
    if missing or result.unexpected_keys:
        raise ValueError(f"checkpoint does not match the model: missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(result.unexpected_keys)[:5]}")
    model.tie_weights()
    model.eval()
    return model, AutoTokenizer.from_pretrained(folder)


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
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path} has no .safetensors files")
    modules: dict[str, dict[str, Tensor]] = {}
    for f in files:
        with safe_open(f, "pt") as st:
            for key in st.keys():
                fqn, _, name = key.rpartition(".")
                modules.setdefault(fqn, {})[name] = st.get_tensor(key)
    rows = []
    for fqn, t in sorted(modules.items()):
        nbytes = sum(v.numel() * v.element_size() for v in t.values())
        if "weight_packed" in t:
            out, cols = (int(v) for v in t["weight_shape"].tolist())
            weights = next((g["weights"] for g in qc.get("config_groups", {}).values()
                            if fqn in g.get("targets", []) or "Linear" in g.get("targets", [])), {})
            bits = int(ours.get(fqn, {}).get("bits", weights.get("num_bits", 0)))
            group = ours.get(fqn, {}).get("group_size", weights.get("group_size") or -1)
            sym = weights.get("symmetric", True)
            codes = unpack_codes(t["weight_packed"], bits, cols)
            if sym:
                zeros = (codes == 2 ** (bits - 1)).float().mean().item()
            else:
                zp = unpack_codes(t["weight_zero_point"].t().contiguous(), bits, out).t()  # [out, stored groups]
                z = zp.repeat_interleave(cols // zp.shape[1], dim=1)  # stored groups divide cols exactly
                zeros = (codes == z).float().mean().item()
            rows.append({"module": fqn, "type": "quant", "bits": bits, "group": group, "sparsity": zeros,
                         "bytes": nbytes, "fp16_bytes": 2 * out * cols + 2 * t.get("bias", torch.empty(0)).numel()})
        elif "weight" in t and t["weight"].dim() == 2:
            w = t["weight"]
            rows.append({"module": fqn, "type": "dense", "bits": 8 * w.element_size(), "group": None,
                         "sparsity": (w == 0).float().mean().item(), "bytes": nbytes,
                         "fp16_bytes": 2 * sum(v.numel() for v in t.values())})
        else:
            rows.append({"module": fqn, "type": "other", "bits": None, "group": None, "sparsity": None,
                         "bytes": nbytes, "fp16_bytes": 2 * sum(v.numel() for v in t.values())})
    return rows
