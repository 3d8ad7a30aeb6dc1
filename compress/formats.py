"""What is not one class's own in the checkpoint: the config.json records (quantization_config for
stock runtimes, with the sparsity_config of sparse-bitmask Linears; our compression_config), and the
quantized layouts of other tools, read into QuantLinear.
Each compressed Linear writes and reads its own tensors (layers.py: CompressedLinear.tensors,
from_tensors); QuantLinear's are compressed-tensors `pack-quantized`, per module:

    {fqn}.weight_packed      int32 [out, ceil(in·bits/32)]   compress.pack layout
    {fqn}.weight_scale       float16 [out, n_groups]
    {fqn}.weight_zero_point  int32 [ceil(out·bits/32), n_groups], signed zeros packed along the
                             output dim (asymmetric grids only)
    {fqn}.weight_shape       int64 [2]

compressed-tensors needs in % group_size == 0. A layer with a ragged last group (576 inputs at
group 128) is written exactly at the largest group size that divides both (64), each scale
repeated (layers.stored_group); our own `compression_config` records the true group size, so `load`
gets it back. llm-compressor writes the same layout, read here with its config group's arguments.

GPTQ format (AutoGPTQ, GPTQModel; read only), per module:

    {fqn}.qweight  int32 [in·bits/32, out]   codes packed along the input dim, LSB first
    {fqn}.qzeros   int32 [n_groups, out·bits/32]  zero points packed along the output dim;
                   checkpoint_format "gptq" (v1) stores zero − 1
    {fqn}.scales   float16 [n_groups, out]
    {fqn}.g_idx    int32 [in]   group of each input (act-order checkpoints permute it)
"""

from __future__ import annotations

import json
import re

import torch
from torch import Tensor, nn

from .grid import QuantSpec
from .layers import BitmaskLinear, CompressedLinear, QuantLinear
from .pack import pack_codes, unpack_codes

FORMAT_VERSION = 1


def stored_bytes(in_features: int, out_features: int, spec: QuantSpec) -> int:
    """Bytes a quantized Linear's weight takes in the checkpoint (codes, scales, zero points, shape)."""
    m = QuantLinear(in_features, out_features, spec)
    return sum(t.numel() * t.element_size() for t in m.tensors().values())


def quantization_config(quant: dict[str, CompressedLinear], sparse: dict[str, BitmaskLinear] | None = None) -> dict:
    """config.json's quantization_config: one config group per distinct stored scheme (each class's
    scheme(): compressed-tensors format, weights and input_activations args), and the sparsity_config
    of the sparse-bitmask Linears, if any (alone, as compressed-tensors wrote a sparse-only model: no
    format, no config groups). Schemes of several formats make it `mixed-precision`, each group
    naming its own format."""
    config = {"quant_method": "compressed-tensors"}
    if sparse:
        config["sparsity_config"] = sparsity_config(sparse)
    if not quant:
        return config
    groups: dict[str, list[str]] = {}
    for fqn, m in quant.items():
        groups.setdefault(json.dumps(m.scheme(), sort_keys=True), []).append(fqn)
    schemes = [(json.loads(key), names) for key, names in groups.items()]  # by format, bits, group, sym
    schemes.sort(key=lambda s: (s[0][0], s[0][1]["num_bits"], s[0][1]["group_size"] or -1, s[0][1]["symmetric"],
                                json.dumps(s[0])))
    formats = {fmt for (fmt, _, _), _ in schemes}
    fmt = formats.pop() if len(formats) == 1 else "mixed-precision"
    config_groups = {}
    for i, ((own, weights, acts), names) in enumerate(schemes):
        config_groups[f"group_{i}"] = {"targets": sorted(names), "weights": weights, "input_activations": acts,
                                       "output_activations": None, **({"format": own} if fmt != own else {})}
    return {**config, "format": fmt, "quantization_status": "compressed",
            "config_groups": config_groups, "ignore": [], "kv_cache_scheme": None,
            "global_compression_ratio": None}


def sparsity_config(sparse: dict[str, BitmaskLinear]) -> dict:
    """compressed-tensors' BitmaskConfig as its ModelCompressor wrote it: the Linears by name (what
    llm-compressor's targets were, past a sparsity threshold); global_sparsity is informational, here
    the zeros among their weights. Reads shapes only: meta tensors will do."""
    kept = sum(m.compressed.numel() for m in sparse.values())
    total = sum(m.in_features * m.out_features for m in sparse.values())
    return {"format": "sparse-bitmask", "global_sparsity": 1 - kept / total, "sparsity_structure": "unstructured",
            "targets": sorted(sparse), "ignore": [], "registry_requires_subclass": False}


def compression_config(entries: dict[str, dict], shapes: dict[str, tuple[int, int]] | None = None) -> dict:
    """Our own record: every compressed Linear's entry (CompressedLinear.entry), exact where the
    compressed-tensors config is not (ragged groups) and of what it cannot express (low-rank factors,
    OWQ, LeanQuant, ...), and the per-layer shapes of plain Linears ({"type": "shape"})."""
    from . import __version__

    modules = dict(entries)
    for fqn, shape in (shapes or {}).items():  # a quantized one keeps its quant entry: its tensors give the shape
        modules.setdefault(fqn, {"type": "shape", "shape": list(shape)})
    return {"format_version": FORMAT_VERSION, "producer": f"compress {__version__}", "modules": modules}


def from_compressed_tensors(t: dict[str, Tensor], weights: dict, fqn: str) -> QuantLinear:
    """A QuantLinear from one module's pack-quantized tensors (with its bias, if any) as another tool
    (llm-compressor) writes them, and the weights args of the config group that targets it."""
    if weights.get("type", "int") != "int" or weights.get("strategy") not in ("group", "channel"):
        raise ValueError(f"{fqn}: only int weights with group or channel strategy are supported, got {weights}")
    stored = -1 if weights["strategy"] == "channel" else int(weights["group_size"])
    entry = {"type": "quant", "bits": int(weights["num_bits"]), "group_size": stored,
             "sym": bool(weights.get("symmetric", True))}
    return QuantLinear.from_packed(t, entry, stored, fqn)


def target_hit(fqn: str, module: nn.Module, patterns) -> bool:
    """compressed-tensors' matching: an exact name, "re:<regex>" on the name, or a class name."""
    for p in patterns or ():
        if p.startswith("re:"):
            if re.match(p[3:], fqn):
                return True
        elif p == fqn or any(c.__name__ == p for c in type(module).__mro__):
            return True
    return False




def from_gptq_tensors(t: dict[str, Tensor], bits: int, group_size: int, v1: bool, fqn: str) -> QuantLinear:
    """A QuantLinear from one module's GPTQ-format tensors (qweight, qzeros, scales, g_idx, bias)."""
    if 32 % bits:
        raise ValueError(f"{fqn}: GPTQ-format {bits}-bit packing is not supported (2, 4 and 8 bits are)")
    qweight, qzeros, scales = t["qweight"], t["qzeros"], t["scales"]
    cols, out = qweight.shape[0] * 32 // bits, qweight.shape[1]
    groups = scales.shape[0]
    g = -1 if groups == 1 and group_size in (-1, cols) else group_size
    if "g_idx" in t:
        expected = torch.arange(cols) // (cols if g == -1 else g)
        if not torch.equal(t["g_idx"].long(), expected):
            raise ValueError(f"{fqn}: act-order checkpoints with a permuted g_idx are not supported")
    codes = unpack_codes(qweight.t().contiguous(), bits, cols)
    zero = unpack_codes(qzeros, bits, out).t()  # [out, groups]
    if v1:
        zero = ((zero.to(torch.int16) + 1) % 2**bits).to(torch.uint8)
    sym = bool((zero == 2 ** (bits - 1)).all())
    bias = t.get("bias")
    m = QuantLinear(cols, out, QuantSpec(bits, g, sym), bias is not None,
                    bias.dtype if bias is not None else torch.float32, scale_dtype=scales.dtype)
    if m.weight_scale.shape != (out, groups):
        raise ValueError(f"{fqn}: {groups} scale groups do not fit {cols} inputs at group size {group_size}")
    m.weight_packed.copy_(pack_codes(codes, bits))
    m.weight_scale.copy_(scales.t())
    m.weight_zero_point.copy_(zero)
    if bias is not None:
        m.bias.data.copy_(bias)
    return m
