"""Saving compressed models: the safetensors weights, config.json's quantization_config and
compression_config, the tokenizer, recipe.yaml and report.json. Output folders are complete or absent.

Every compressed Linear writes its own tensors and compression_config entry (layers.FORMATS, the
CompressedLinear protocol); nothing here knows one class from another. Quantized Linears are in the
compressed-tensors `pack-quantized` layout with its `quantization_config` in config.json (formats.py),
so stock transformers (with the compressed-tensors package) and vLLM load those checkpoints without us;
pruned ones are dense unless asked for in compressed-tensors' `sparse-bitmask` (store_sparse_).
Also here: what stock runtimes can make of a model (stock_notes) and the plain-Linear export
(to_dense_). Reading checkpoints back is loading.py.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import Tensor, nn

from .formats import compression_config, quantization_config
from .layers import FORMATS, BitmaskLinear, CompressedLinear, QuantLinear, stored_group, to_linear
from .model import decoder_blocks, fp32_tensors, set_module, weight_matrix
from .moe import UnfusedExperts
from .outdir import atomic_folder
from .recipe import Recipe, dump_recipe


def save(model, tokenizer, out_dir: str | Path, *, recipe: Recipe | None = None, report: dict | None = None,
         overwrite: bool = False, dtype: torch.dtype | None = None, sparse_format: str | None = None) -> Path:
    """Write model (safetensors), tokenizer, recipe.yaml and report.json into out_dir.

    Everything is written to a temporary sibling folder first and renamed into place at the end,
    so an interrupted save leaves no folder that looks complete. A model without QuantLinears
    loads with stock `AutoModelForCausalLM.from_pretrained(out_dir)`; one with QuantLinears
    needs the compressed-tensors package installed next to transformers. Unquantized tensors
    (embeddings, norms, biases, Linears left dense) are written in `dtype`, by default
    `storage_dtype(model)`, and config.json records it as HF checkpoints do. `sparse_format`
    "bitmask" or "dense" first changes how the decoder blocks' pruned Linears are held, in place
    (store_sparse_); None keeps them as they are.
    """
    dtype = dtype or storage_dtype(model)
    if sparse_format is not None:
        store_sparse_(decoder_blocks(model), sparse_format, dtype)
    # per-expert tensors keep the module names config.json's records use: transformers' reverse
    # renaming (Mixtral's mlp -> block_sparse_moe) would part them; its loader takes both
    moe = any(isinstance(m, UnfusedExperts) for m in model.modules())
    with atomic_folder(out_dir, overwrite) as tmp:
        model.save_pretrained(tmp, state_dict=checkpoint_tensors(model, dtype=dtype, fp32=fp32_tensors(model)),
                              save_original_format=not moe)
        add_compression_config(model, tmp)
        record_dtype(tmp, dtype)
        write_extras(tmp, tokenizer, recipe, report)
    return Path(out_dir).resolve()


def storage_dtype(model: nn.Module) -> torch.dtype:
    """The precision the model's weights had at the source (`load_model` sets `source_dtype`: the
    safetensors files' float type, 16-bit for a GGUF), else the one it computes in."""
    source = getattr(model, "source_dtype", None)
    return source or next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def checkpoint_tensors(module: nn.Module, prefix: str = "", dtype: torch.dtype | None = None,
                       fp32: re.Pattern | None = None) -> dict[str, Tensor]:
    """The module's state_dict as the checkpoint names it (keys under `prefix`): every compressed
    Linear's own buffers are replaced by its tensors(), and the other floating tensors are cast to
    `dtype` when one is given (the compressed ones keep their own dtypes; those `fp32` names, float32)."""
    join = (lambda n: f"{prefix}.{n}") if prefix else (lambda n: n)
    state = plain_tensors(module) if dtype is None else cast_floats(plain_tensors(module), dtype, fp32)
    state = {join(k): v for k, v in state.items()}
    for name, m in compressed_modules(module).items():
        state.update({f"{join(name)}.{k}": v for k, v in m.tensors().items()})
    return state


def cast_floats(state: dict[str, Tensor], dtype: torch.dtype, fp32: re.Pattern | None = None) -> dict[str, Tensor]:
    """The floating tensors of `state` cast to dtype, those whose names `fp32` matches to float32
    (model.fp32_tensors). Tensors that share storage (a tied lm_head and its embeddings) stay one
    tensor, so that saving still recognizes the tie and writes it once."""
    cast: dict[tuple, Tensor] = {}
    out = {}
    for k, v in state.items():
        key = (v.data_ptr(), v.shape, v.stride())
        if v.is_floating_point() and key not in cast:
            cast[key] = v.to(torch.float32 if fp32 is not None and fp32.search(k) else dtype)
        out[k] = cast[key] if v.is_floating_point() else v
    return out


def plain_tensors(module: nn.Module) -> dict[str, Tensor]:
    """The state_dict entries saved as they are: all but the compressed Linears' own buffers (their
    biases stay, and a low-rank Linear's factors are modules of their own)."""
    state = dict(module.state_dict())
    for name, m in compressed_modules(module).items():
        for k in own_tensors(m):
            if k != "bias":
                del state[f"{name}.{k}" if name else k]
    return state


def own_tensors(m: nn.Module) -> list[str]:
    """The names of m's own buffers and parameters (not its children's)."""
    return [k for k, _ in (*m.named_buffers(recurse=False), *m.named_parameters(recurse=False))]


def round_to_storage_(model: nn.Module, dtype: torch.dtype) -> None:
    """Round the tensors `save` writes as they are to `dtype` in place (kept in their own dtype), so
    that a perplexity measured before saving is the saved checkpoint's."""
    fp32 = fp32_tensors(model)
    with torch.no_grad():
        for name, t in plain_tensors(model).items():
            if t.is_floating_point() and t.dtype != dtype and not (fp32 is not None and fp32.search(name)):
                t.copy_(t.to(dtype))


SPARSE_FORMATS = ("dense", "bitmask")
# bitmask only where it takes at most this much of the dense bytes: unpacking costs time at every
# forward, so it must save a tenth (at 16 bits: from about 17% zeros; a Linear not pruned stays dense)
BITMASK_MAX_RATIO = 0.9


def store_sparse_(blocks: nn.Module, sparse_format: str, dtype: torch.dtype) -> None:
    """How the plain Linears below `blocks` (the decoder blocks, or one block of a stream) are saved,
    in place: "bitmask" replaces each nn.Linear whose sparse-bitmask layout at `dtype` takes at most
    BITMASK_MAX_RATIO of its dense bytes by a BitmaskLinear (same forward, weights rounded to dtype);
    "dense" turns BitmaskLinears back into nn.Linears. Quantized Linears stay as they are (pack-quantized:
    compressed-tensors defines no bitmask over packed codes)."""
    if sparse_format not in SPARSE_FORMATS:
        raise ValueError(f"sparse format must be one of {', '.join(SPARSE_FORMATS)}, got {sparse_format!r}")
    compute = next((p.dtype for p in blocks.parameters() if p.is_floating_point()), torch.float32)
    for name, m in list(blocks.named_modules()):
        if sparse_format == "bitmask" and type(m) is nn.Linear:  # not GPT-2's Conv1D: it stores W transposed
            new = BitmaskLinear.from_linear(m, dtype)
            if sum(t.nbytes for t in new.tensors().values()) <= BITMASK_MAX_RATIO * m.weight.numel() * dtype.itemsize:
                set_module(blocks, name, new)
        elif sparse_format == "dense" and isinstance(m, BitmaskLinear):
            set_module(blocks, name, to_linear(m, compute))


def record_dtype(folder: Path, dtype: torch.dtype) -> None:
    """config.json's `dtype`: the one the unquantized tensors are stored in (save_pretrained writes the
    dtype the model computed in)."""
    config = json.loads((folder / "config.json").read_text())
    config["dtype"] = str(dtype).removeprefix("torch.")
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def add_compression_config(model: nn.Module, folder: Path) -> None:
    """Add quantization_config and compression_config to folder/config.json, as the model needs
    them (nothing for a plain model). Reads module types and shapes only: meta tensors will do."""
    found, shapes = compressed_modules(model), reshaped_linears(model)
    if found or shapes:
        config = json.loads((folder / "config.json").read_text())
        quant = {fqn: m for fqn, m in found.items() if m.pack_quantized}
        sparse = {fqn: m for fqn, m in found.items() if m.sparse_bitmask}
        if quant or sparse:
            config["quantization_config"] = quantization_config(quant, sparse)
        config["compression_config"] = compression_config({fqn: m.entry() for fqn, m in found.items()}, shapes)
        (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def write_extras(folder: Path, tokenizer, recipe: Recipe | None, report: dict | None) -> None:
    """The tokenizer, the resolved recipe.yaml and report.json, next to the weights."""
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    if recipe is not None:
        (folder / "recipe.yaml").write_text(dump_recipe(recipe))
    if report is not None:
        (folder / "report.json").write_text(json.dumps(report, indent=2) + "\n")


def compressed_modules(model: nn.Module) -> dict[str, CompressedLinear]:
    """fqn -> every compressed Linear of the model (a low-rank Linear before its factors)."""
    return {fqn: m for fqn, m in model.named_modules() if isinstance(m, CompressedLinear)}


def reshaped_linears(model: nn.Module) -> dict[str, tuple[int, int]]:
    """fqn -> (out, in) of every Linear whose shape differs from what the config builds: per-layer
    shapes left by a non-uniform structured removal, which config.json alone cannot state."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        ref = AutoModelForCausalLM.from_config(model.config)
    expected = {fqn: tuple(weight_matrix(m).shape) for fqn, m in ref.named_modules() if isinstance(m, nn.Linear)}
    shapes = {}
    for fqn, m in model.named_modules():
        if fqn in expected and isinstance(m, nn.Linear | CompressedLinear):
            shape = (m.out_features, m.in_features)
            if shape != expected[fqn]:
                shapes[fqn] = shape
    return shapes


def stock_notes(model: nn.Module) -> list[str]:
    """What a stock runtime (transformers, vLLM) can and cannot take of this model, one line each."""
    found, notes = compressed_modules(model), []
    for cls in FORMATS.values():
        n = sum(type(m) is cls for m in found.values())
        if n and cls.stock_note:
            notes.append(cls.stock_note.format(n=n))
    quant = [m for m in found.values() if m.pack_quantized]
    asym = [m for m in quant if isinstance(m, QuantLinear) and not m.spec.sym]
    if asym:
        notes.append(f"{len(asym)} asymmetric quantized Linears: transformers 5.24 with compressed-tensors 0.20 "
                     "fails to load asymmetric pack-quantized checkpoints; compress.load and convert --dense read them")
    mixed = _mixed_experts(model, found)
    if mixed:
        notes.append(mixed)
    if quant and not asym and not mixed and all(m.pack_quantized for m in found.values()):
        kinds = sorted({m.scheme()[0] for m in quant})
        notes.append(f"quantized Linears in compressed-tensors {' and '.join(kinds)}: stock transformers (with the "
                     "compressed-tensors package) and vLLM load this checkpoint")
    shapes = reshaped_linears(model)
    if shapes:
        notes.append(f"{len(shapes)} Linears have per-layer shapes (a non-uniform structured removal) that config.json "
                     "cannot state: stock runtimes cannot load them; compress.load can")
    if not found and not shapes:
        notes.append("plain Linears (any removed units are in the config's sizes): stock from_pretrained loads it")
    return notes


def _mixed_experts(model: nn.Module, found: dict[str, CompressedLinear]) -> str | None:
    """A note when quantized MoE experts are not all in the first config group (quantization_config
    sorts them): transformers 5.25 dequantizes every expert with that one group's scheme."""
    scheme = lambda m: (m.spec.bits, stored_group(m.spec, m.in_features), m.spec.sym)  # noqa: E731
    quant = {fqn: scheme(m) for fqn, m in found.items() if isinstance(m, QuantLinear)}
    experts = {f"{fqn}.{n}" for fqn, m in model.named_modules() if isinstance(m, UnfusedExperts)
               for n, _ in m.named_modules()}
    routed = {s for fqn, s in quant.items() if fqn in experts}
    if not routed or routed == {min(quant.values())}:
        return None
    return (f"MoE experts quantized with {len(routed)} schemes (bits, stored group, sym), or another than the first "
            "config group's: transformers 5.25 dequantizes every expert with the first group's, so its from_pretrained "
            "fails or misreads them; compress.load and convert --dense read them")


def to_dense_(model: nn.Module) -> None:
    """Replace every compressed Linear by an nn.Linear holding its dense_weight() (in place): a
    low-rank Linear's factors first, then the product of them."""
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    for fqn, m in reversed(compressed_modules(model).items()):
        set_module(model, fqn, to_linear(m, dtype))
