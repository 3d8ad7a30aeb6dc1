"""On-disk layouts of quantized Linears, converted to and from QuantLinear.

compressed-tensors `pack-quantized` (what we write), per module:

    {fqn}.weight_packed      int32 [out, ceil(in·bits/32)]   compress.pack layout
    {fqn}.weight_scale       float16 [out, n_groups]
    {fqn}.weight_zero_point  int32 [ceil(out·bits/32), n_groups], signed zeros packed along the
                             output dim (asymmetric grids only)
    {fqn}.weight_shape       int64 [2]

compressed-tensors needs in % group_size == 0. A layer with a ragged last group (576 inputs at
group 128) is written exactly at the largest group size that divides both (64), each scale
repeated; our own `compression_config` records the true group size, so `load` gets it back.

GPTQ format (AutoGPTQ, GPTQModel; read only), per module:

    {fqn}.qweight  int32 [in·bits/32, out]   codes packed along the input dim, LSB first
    {fqn}.qzeros   int32 [n_groups, out·bits/32]  zero points packed along the output dim;
                   checkpoint_format "gptq" (v1) stores zero − 1
    {fqn}.scales   float16 [n_groups, out]
    {fqn}.g_idx    int32 [in]   group of each input (act-order checkpoints permute it)
"""

from __future__ import annotations

import math
import re

import torch
from torch import Tensor, nn

from .grid import QuantSpec
from .layers import DenseSparseLinear, LutLinear, OutlierQuantLinear, QuantLinear
from .pack import pack_codes, unpack_codes

FORMAT_VERSION = 1


def _stored_group(m: QuantLinear) -> int:
    """The group size written to disk: -1 per row, else one that divides in_features."""
    g = m.spec.group(m.in_features)
    if g >= m.in_features:
        return -1
    return g if m.in_features % g == 0 else math.gcd(g, m.in_features)


def compressed_tensors_tensors(m: QuantLinear) -> dict[str, Tensor]:
    """The module's tensors in the pack-quantized layout (module-local names)."""
    g, stored = m.spec.group(m.in_features), _stored_group(m)
    repeat, n_stored = (1, 1) if stored == -1 else (g // stored, m.in_features // stored)
    scale = m.weight_scale.repeat_interleave(repeat, dim=1)[:, :n_stored]
    tensors = {
        "weight_packed": m.weight_packed,
        "weight_scale": scale.contiguous(),
        "weight_shape": torch.tensor([m.out_features, m.in_features], dtype=torch.int64),
    }
    if not m.spec.sym:
        zero = m.weight_zero_point.repeat_interleave(repeat, dim=1)[:, : scale.shape[1]]
        tensors["weight_zero_point"] = pack_codes(zero.t().contiguous(), m.spec.bits).t().contiguous()
    return tensors


def stored_bytes(in_features: int, out_features: int, spec: QuantSpec) -> int:
    """Bytes a quantized Linear's weight takes in the checkpoint (codes, scales, zero points, shape)."""
    m = QuantLinear(in_features, out_features, spec)
    return sum(t.numel() * t.element_size() for t in compressed_tensors_tensors(m).values())


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


def compression_config(quant: dict[str, QuantLinear], lowrank: dict[str, nn.Module] | None = None,
                       shapes: dict[str, tuple[int, int]] | None = None, custom: dict[str, nn.Module] | None = None
                       ) -> dict:
    """Our own record, exact where the compressed-tensors config is not (ragged groups), and of what
    it cannot express: low-rank factors ({fqn}.u, {fqn}.v with the rank), per-layer shapes, and the
    OWQ and LeanQuant layouts (custom_entry)."""
    from . import __version__

    modules = {fqn: {"type": "quant", "bits": m.spec.bits, "group_size": m.spec.group_size, "sym": m.spec.sym,
                     **m.config_extra()} for fqn, m in quant.items()}
    modules.update({fqn: custom_entry(m) for fqn, m in (custom or {}).items()})
    modules.update({fqn: {"type": "lowrank", "rank": m.rank} for fqn, m in (lowrank or {}).items()})
    for fqn, shape in (shapes or {}).items():  # a quantized one keeps its quant entry: its tensors give the shape
        modules.setdefault(fqn, {"type": "shape", "shape": list(shape)})
    return {"format_version": FORMAT_VERSION, "producer": f"compress {__version__}", "modules": modules}


def from_compressed_tensors(t: dict[str, Tensor], weights: dict, ours: dict | None, bias: Tensor | None,
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


# OWQ, dense-and-sparse and LeanQuant modules: our own layouts, recorded in compression_config only (stock
# runtimes cannot load them). OWQ ("owq"): the pack-quantized tensors above plus
#     {fqn}.weight_outlier  float16 [out, k]      the weak input columns, kept
#     {fqn}.outlier_idx     int32 [k]             their indices (their codes dequantize to 0)
# Dense-and-sparse ("densesparse"): the pack-quantized tensors above plus
#     {fqn}.weight_sparse   float16 [k]           the detached weights
#     {fqn}.sparse_idx      int32 [k]             their flat positions row · in + col, ascending
# LeanQuant ("lut"):
#     {fqn}.weight_packed   int32 [out, ceil(in·bits/32)]    codes, compress.pack layout
#     {fqn}.weight_lut      float16 [out, n_groups, 2^bits]  Ŵ[o, j] = lut[o, j // group_size, q[o, j]]
#     {fqn}.weight_shape    int64 [2]
CUSTOM_TENSORS = {"owq": {"weight_outlier", "outlier_idx"}, "densesparse": {"weight_sparse", "sparse_idx"},
                  "lut": {"weight_lut"}}


def custom_entry(m: nn.Module) -> dict:
    if isinstance(m, LutLinear):
        return {"type": "lut", "bits": m.bits, "group_size": m.group_size}
    s = m.spec
    if isinstance(m, DenseSparseLinear):
        return {"type": "densesparse", "bits": s.bits, "group_size": s.group_size, "sym": s.sym,
                "sparse": m.sparse_idx.numel()}
    return {"type": "owq", "bits": s.bits, "group_size": s.group_size, "sym": s.sym, "outliers": m.outlier_idx.numel()}


def custom_tensors(m: nn.Module) -> dict[str, Tensor]:
    """An OWQ, dense-and-sparse or LeanQuant module's tensors as written to disk (module-local
    names, bias aside)."""
    shape = torch.tensor([m.out_features, m.in_features], dtype=torch.int64)
    if isinstance(m, LutLinear):
        return {"weight_packed": m.weight_packed, "weight_lut": m.weight_lut, "weight_shape": shape}
    if isinstance(m, DenseSparseLinear):
        return {**compressed_tensors_tensors(m), "weight_sparse": m.weight_sparse, "sparse_idx": m.sparse_idx}
    return {**compressed_tensors_tensors(m), "weight_outlier": m.weight_outlier, "outlier_idx": m.outlier_idx}


def from_custom_tensors(t: dict[str, Tensor], entry: dict, fqn: str) -> nn.Module:
    """An OutlierQuantLinear, DenseSparseLinear or LutLinear from its tensors (custom_tensors, with
    bias) and its compression_config entry."""
    t = dict(t)
    bias = t.pop("bias", None)
    missing = ({"weight_packed", "weight_shape"} | CUSTOM_TENSORS[entry["type"]]) - set(t)
    if missing:
        raise ValueError(f"{fqn}: the {entry['type']} layer lacks tensors {sorted(missing)}")
    dtype = bias.dtype if bias is not None else torch.float32
    out, cols = (int(v) for v in t["weight_shape"].tolist())
    bits, group = int(entry["bits"]), int(entry["group_size"])
    if entry["type"] == "lut":
        m = LutLinear(cols, out, bits, group, bias is not None, dtype)
    else:
        spec = QuantSpec(bits, group, bool(entry["sym"]))
        stored = _stored_group(QuantLinear(cols, out, spec, device="meta"))
        weights = {"num_bits": bits, "type": "int", "symmetric": spec.sym, "group_size": stored,
                   "strategy": "channel" if stored == -1 else "group"}
        base = from_compressed_tensors({k: v for k, v in t.items() if k in _CT_NAMES}, weights, entry, bias, fqn)
        cls, k = ((DenseSparseLinear, entry["sparse"]) if entry["type"] == "densesparse"
                  else (OutlierQuantLinear, entry["outliers"]))
        m = cls(cols, out, spec, int(k), bias is not None, dtype, scale_dtype=base.weight_scale.dtype)
        m.load_state_dict(base.state_dict(), strict=False)
        t = {k: v for k, v in t.items() if k not in _CT_NAMES}
    t.pop("weight_shape", None)
    own = m.state_dict()
    for name, value in t.items():
        if name not in own or own[name].shape != value.shape:
            raise ValueError(f"{fqn}: tensor {name} {tuple(value.shape)} does not fit a {entry['type']} "
                             f"{bits}-bit [{out}, {cols}] layer")
        own[name].copy_(value)
    if bias is not None:
        m.bias.data.copy_(bias)
    return m


_CT_NAMES = {"weight_packed", "weight_scale", "weight_zero_point", "weight_shape"}
