"""FloatLinear: a Linear on one of fpquant's formats (FP8, FP8 blocks, NVFP4, MXFP4, INT8), its
activations optionally quantized too, stored as compressed-tensors stores it, so that stock
transformers (with compressed-tensors) and vLLM load it.

Buffers, which are the checkpoint tensors (module-local names), by format:
    fp8, fp8-block  weight float8_e4m3fn [out, in]; weight_scale fp32 [out, 1] or [⌈out/128⌉, ⌈in/128⌉]
    int8            weight int8 [out, in]; weight_scale fp32 [out, 1]
    nvfp4           weight_packed uint8 [out, in/2]; weight_scale float8_e4m3fn [out, in/16];
                    weight_global_scale fp32 [1]
    mxfp4           weight_packed uint8 [out, in/2]; weight_scale uint8 [out, in/32] (127 + log2 s)
and, for static activations, input_scale fp32 [1] (fp8-tensor) or input_global_scale fp32 [1] (nvfp4).
FP4 codes: two per byte, the even input in the low nibble; bit 3 the sign, bits 0-2 the index of
the magnitude in 0, 0.5, 1, 1.5, 2, 3, 4, 6.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .compressed import CompressedLinear, fill_
from .fpquant import ACT_FORMAT, E2M1, FORMATS, STATIC_ACTS, FloatQuantized, expand_scale, fake_quant_act
from .pack import dequantize_fp4, pack_fp4

# compressed-tensors' format of each weight format, and its QuantizationArgs
CT_FORMAT = {"fp8": "float-quantized", "fp8-block": "float-quantized", "int8": "int-quantized",
             "nvfp4": "nvfp4-pack-quantized", "mxfp4": "mxfp4-pack-quantized"}
_FLOAT = {"type": "float", "symmetric": True, "dynamic": False}
CT_WEIGHTS = {
    "fp8": {"num_bits": 8, **_FLOAT, "strategy": "channel", "group_size": None},
    "fp8-block": {"num_bits": 8, **_FLOAT, "strategy": "block", "block_structure": [128, 128], "group_size": None},
    "int8": {"num_bits": 8, "type": "int", "symmetric": True, "dynamic": False, "strategy": "channel",
             "group_size": None},
    "nvfp4": {"num_bits": 4, **_FLOAT, "strategy": "tensor_group", "group_size": 16,
              "scale_dtype": "torch.float8_e4m3fn"},
    "mxfp4": {"num_bits": 4, **_FLOAT, "strategy": "group", "group_size": 32, "scale_dtype": "torch.uint8"},
}
CT_ACTS = {
    "fp8-token": {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": True, "strategy": "token"},
    "fp8-group": {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": True, "strategy": "group",
                  "group_size": 128},
    "fp8-tensor": {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": False, "strategy": "tensor"},
    "int8-token": {"num_bits": 8, "type": "int", "symmetric": True, "dynamic": True, "strategy": "token"},
    "nvfp4": {"num_bits": 4, "type": "float", "symmetric": True, "dynamic": "local", "strategy": "tensor_group",
              "group_size": 16, "scale_dtype": "torch.float8_e4m3fn"},
}


def fp4_codes(values: Tensor) -> Tensor:
    """E2M1 values -> 4-bit codes (uint8): sign in bit 3, magnitude index in bits 0-2 (pack.e2m1_values
    decodes them)."""
    index = torch.bucketize(values.abs(), E2M1.to(values.device))  # exact values: their own index
    return (index | ((values < 0).to(torch.int64) << 3)).to(torch.uint8)


class FloatLinear(CompressedLinear):
    """A Linear whose weight is on fpquant Format `fmt` (module docstring: its tensors), with `act`
    activations (fpquant.ACTS) or 16-bit ones (None). Forward dequantizes the weight and, with `act`,
    fake-quantizes the inputs as the format defines it, so perplexity is the deployed model's."""

    kind, pack_quantized = "fp", True

    def __init__(self, in_features: int, out_features: int, fmt: str, act: str | None = None, bias: bool = False,
                 dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        if fmt not in FORMATS:
            raise ValueError(f"unknown float format {fmt!r}; known: {', '.join(FORMATS)}")
        f = FORMATS[fmt]
        if f.element == "e2m1" and in_features % f.group:
            raise ValueError(f"{fmt} needs in_features divisible by {f.group}, got {in_features}")
        self.in_features, self.out_features, self.fmt, self.act = in_features, out_features, fmt, act
        rows, groups = f.groups(out_features, in_features)
        z = dict(device=device)
        if f.element == "e2m1":
            self.register_buffer("weight_packed", torch.zeros(out_features, in_features // 2, dtype=torch.uint8, **z))
            scale_dtype = torch.float8_e4m3fn if f.scale == "e4m3" else torch.uint8
            self.register_buffer("weight_scale", torch.zeros(rows, groups, dtype=scale_dtype, **z))
        else:
            element = torch.int8 if f.element == "int8" else torch.float8_e4m3fn
            self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=element, **z))
            self.register_buffer("weight_scale", torch.ones(rows, groups, dtype=torch.float32, **z))
        if f.global_scale:
            self.register_buffer("weight_global_scale", torch.ones(1, **z))
        if act == "fp8-tensor":
            self.register_buffer("input_scale", torch.ones(1, **z))
        elif act == "nvfp4":
            self.register_buffer("input_global_scale", torch.ones(1, **z))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, **z)) if bias else None
        # on the CPU, forward's dequantized weight, kept until the buffers change (never in state_dict)
        self._dense_cache: dict = {}

    def _apply(self, fn, recurse=True):
        """.to(dtype) moves its tensors but keeps their types: a float8 weight or an fp32 scale cast to
        bfloat16 would be another format (or a lossy one)."""
        kept = dict(self._buffers)
        super()._apply(fn, recurse)
        for name, b in kept.items():
            self._buffers[name] = b.to(fn(b[:0]).device)
        return self

    @property
    def format(self):
        return FORMATS[self.fmt]

    @classmethod
    def from_quantized(cls, qw: FloatQuantized, bias: Tensor | None = None, act: str | None = None,
                       act_scale: Tensor | None = None) -> FloatLinear:
        out, cols = qw.values.shape
        m = cls(cols, out, qw.fmt.name, act, bias is not None, bias.dtype if bias is not None else torch.float32,
                qw.values.device)
        with torch.no_grad():
            if qw.fmt.element == "e2m1":
                m.weight_packed.copy_(pack_fp4(fp4_codes(qw.values)))
                if qw.fmt.scale == "e4m3":
                    m.weight_scale.copy_(qw.stored.to(torch.float8_e4m3fn))
                else:
                    m.weight_scale.copy_((torch.log2(qw.stored).round() + 127).to(torch.uint8))
            else:
                m.weight.copy_(qw.values.to(m.weight.dtype))
                m.weight_scale.copy_(qw.stored)
            if qw.global_scale is not None:
                m.weight_global_scale.copy_(qw.global_scale)
            if act in STATIC_ACTS:
                m.act_static.copy_(act_scale)
            if bias is not None:
                m.bias.copy_(bias)
        return m

    @property
    def act_static(self) -> Tensor | None:
        return {"fp8-tensor": getattr(self, "input_scale", None),
                "nvfp4": getattr(self, "input_global_scale", None)}.get(self.act)

    def dense_weight(self) -> Tensor:
        f = self.format
        if f.element == "e2m1":
            return dequantize_fp4(self.weight_packed, self.weight_scale, getattr(self, "weight_global_scale", None),
                                  f.group, self.in_features)
        values, stored = self.weight.float(), self.weight_scale
        scale = stored / self.weight_global_scale if f.global_scale else stored
        return values * expand_scale(scale, f, self.out_features, self.in_features)

    def forward(self, x: Tensor) -> Tensor:
        if self.act is not None:
            x = fake_quant_act(x, self.act, self.act_static)
        return F.linear(x, self._weight_for(x), self.bias)

    def _weight_for(self, x: Tensor) -> Tensor:
        """The dequantized weight in x's dtype; on the CPU built once per (dtype, buffer versions): an
        evaluation would otherwise dequantize every Linear at every call (on GPUs: the kernels' job)."""
        if x.device.type != "cpu":
            return self.dense_weight().to(x.dtype)
        stamp = (x.dtype, *((id(b), b._version) for b in self._buffers.values()))
        if self._dense_cache.get("stamp") != stamp:
            self._dense_cache = {"stamp": stamp, "weight": self.dense_weight().to(x.dtype)}
        return self._dense_cache["weight"]

    def entry(self) -> dict:
        return {"type": self.kind, "format": self.fmt, "act": self.act}

    @classmethod
    def empty(cls, layout: dict, dtype: torch.dtype = torch.float32, device=None) -> FloatLinear:
        return cls(layout["in"], layout["out"], layout["format"], layout.get("act"), layout["bias"], dtype, device)

    def tensors(self) -> dict[str, Tensor]:
        return {n: b for n, b in self.named_buffers(recurse=False)}

    @classmethod
    def from_tensors(cls, t: dict[str, Tensor], entry: dict, fqn: str, like: nn.Module | None = None) -> FloatLinear:
        fmt, act = entry["format"], entry.get("act")
        key = "weight_packed" if "weight_packed" in t else "weight"
        if key not in t:
            raise ValueError(f"{fqn}: a {fmt} layer needs {key}")
        out, cols = t[key].shape[0], t[key].shape[1] * (2 if key == "weight_packed" else 1)
        bias = t.get("bias")
        m = cls(cols, out, fmt, act, bias is not None, bias.dtype if bias is not None else torch.float32)
        return fill_(m, t, fqn, fmt)  # copy_ takes another tool's bf16 scales into our fp32 ones

    def scheme(self) -> tuple[str, dict, dict | None]:
        """(compressed-tensors format, weights args, input_activations args) of its config group."""
        return CT_FORMAT[self.fmt], CT_WEIGHTS[self.fmt], CT_ACTS.get(self.act) if self.act else None

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, format={self.fmt}, "
                f"act={self.act}, bias={self.bias is not None}")


def check_act(fmt: str, act: str | None) -> None:
    """The activation formats a weight format combines with, as compressed-tensors' presets pair them."""
    if act is not None and ACT_FORMAT.get(act, "") not in (fmt, fmt.removesuffix("-block")):
        raise ValueError(f"act_format {act} does not go with format {fmt}")


def _matches(args: dict, ours: dict) -> bool:
    return all(args.get(k) == v for k, v in ours.items() if k not in ("dynamic", "scale_dtype", "block_structure")) \
        and (ours.get("block_structure") is None or list(args.get("block_structure") or []) == ours["block_structure"])


def ct_scheme_format(weights: dict, acts: dict | None, fqn: str) -> tuple[str, str | None]:
    """(our format, activation format) of a compressed-tensors config group's weights and
    input_activations args, as another tool (llm-compressor) wrote them; ValueError naming fqn when
    neither is one of ours."""
    fmt = next((f for f, ours in CT_WEIGHTS.items() if _matches(weights or {}, ours)), None)
    if fmt is None:
        raise ValueError(f"{fqn}: weights {weights} are not one of the formats read here ({', '.join(CT_WEIGHTS)})")
    if not acts:
        return fmt, None
    act = next((a for a, ours in CT_ACTS.items() if _matches(acts, ours) and acts.get("dynamic") == ours["dynamic"]),
               None)
    if act is None:
        raise ValueError(f"{fqn}: input activations {acts} are not one of the formats read here ({', '.join(CT_ACTS)})")
    return fmt, act
