"""Matmul dispatch for compressed Linears: `compress.kernels.dispatch` picks a path per call.

Each op is defined by a pure-torch reference (reference.py) that runs on any device; faster paths
match it and are picked per call:

    triton     x on CUDA and triton importable: quant_matmul.py (4/8-bit), sparse24_matmul.py (2:4)
    cpu        x on the CPU, for quant_linear: torch's packed int8/int4 ops (cpu.py). They compute in
               bfloat16, so auto takes them only for bfloat16 x; float32 x (our default) gets them
               with COMPRESS_KERNELS=cpu, which rounds x to bfloat16 (bounds in cpu.py). Auto also
               keeps calls of more than CPU_MAX_ROWS rows (prefill, perplexity) on the reference,
               which dequantizes once per call and is faster there
    reference  everything else, and float32 x on the CPU unless forced: bitwise our definition; also every
               lut_linear call (non-uniform codes, LeanQuant), which has no fast path yet

COMPRESS_KERNELS=reference|triton|cpu forces a path (auto when unset or "auto"); a forced path that
cannot run the call raises ValueError saying why. Under TRITON_INTERPRET=1 the forced triton path
also runs on CPU tensors (slowly; for tests). triton is imported only when its path is taken.
"""

from __future__ import annotations

import importlib.util
import os

import torch
from torch import Tensor

from . import cpu, reference

__all__ = ["CPU_MAX_ROWS", "kernel_path", "lut_linear", "quant_linear", "sparse24_linear"]

PATHS = ("reference", "triton", "cpu")
CPU_MAX_ROWS = 32


def _forced() -> str | None:
    path = os.environ.get("COMPRESS_KERNELS", "").strip().lower()
    if path in ("", "auto"):
        return None
    if path not in PATHS:
        raise ValueError(f"COMPRESS_KERNELS={path!r}: expected one of {', '.join(PATHS)} (or unset for auto)")
    return path


def _triton_blocker(x: Tensor) -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton)"
    if not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        return f"x is on {x.device}; Triton runs CUDA tensors (or CPU ones under TRITON_INTERPRET=1)"
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"x is {x.dtype}; the Triton kernels take float16, bfloat16 or float32"
    return None


def kernel_path(op: str, x: Tensor, bits: int = 4, group_size: int = -1, g_idx: Tensor | None = None) -> str:
    """The path `op` ("quant" or "sparse24") takes for x: "triton", "cpu" or "reference"."""
    forced = _forced()
    blocker = {"triton": _triton_blocker(x), "cpu": cpu.unsupported(x, bits, group_size, g_idx)}
    if op == "quant" and bits not in (4, 8):
        blocker["triton"] = f"the Triton kernel takes 4- or 8-bit codes, got {bits}"
    if op == "sparse24":
        blocker["cpu"] = "2:4 has no CPU fast path (torch's semi-structured sparse ops are CUDA-only)"
    if forced is not None:
        if forced != "reference" and blocker[forced] is not None:
            raise ValueError(f"COMPRESS_KERNELS={forced} cannot run this {op} call: {blocker[forced]}")
        return forced
    if x.is_cuda and blocker["triton"] is None:
        return "triton"
    rows = x.numel() // max(x.shape[-1], 1)
    if blocker["cpu"] is None and x.dtype != torch.float32 and rows <= CPU_MAX_ROWS:
        return "cpu"
    return "reference"


def quant_linear(
    x: Tensor,
    packed: Tensor,
    scale: Tensor,
    zero: Tensor,
    bits: int,
    group_size: int,
    bias: Tensor | None = None,
    g_idx: Tensor | None = None,
    cache: dict | None = None,
) -> Tensor:
    """y = x Ŵᵀ + b; arguments and result as reference.quant_linear, computed on the path kernel_path picks.

    cache: a dict owned by the caller (QuantLinear) where the CPU path keeps the weight converted to
    its op's layout, rebuilt only when packed/scale/zero change; without it the CPU path converts per call.
    """
    match kernel_path("quant", x, bits, group_size, g_idx):
        case "triton":
            from .quant_matmul import quant_matmul

            return quant_matmul(x, packed, scale, zero, bits, group_size, bias, g_idx)
        case "cpu":
            prepared = _cpu_weight(cache, packed, scale, zero, bits, group_size, x.shape[-1])
            return cpu.quant_linear(x, prepared, bias)
        case _:
            return reference.quant_linear(x, packed, scale, zero, bits, group_size, bias, g_idx)


def sparse24_linear(x: Tensor, values: Tensor, meta: Tensor, bias: Tensor | None = None) -> Tensor:
    """y = x Wᵀ + b with W = unpack_24(values, meta); see reference.sparse24_linear."""
    if kernel_path("sparse24", x) == "triton":
        from .sparse24_matmul import sparse24_matmul

        return sparse24_matmul(x, values, meta, bias)
    return reference.sparse24_linear(x, values, meta, bias)


def lut_linear(x: Tensor, packed: Tensor, lut: Tensor, bits: int, group_size: int, bias: Tensor | None = None
               ) -> Tensor:
    """y = x Ŵᵀ + b with Ŵ[o, j] = lut[o, j // group_size, q[o, j]]; see reference.lut_linear. Non-uniform
    codes have no fast path yet: every device runs the reference (COMPRESS_KERNELS=triton|cpu refuses)."""
    forced = _forced()
    if forced not in (None, "reference"):
        raise ValueError(f"COMPRESS_KERNELS={forced} cannot run this lut call: non-uniform codes have only the "
                         "reference path")
    return reference.lut_linear(x, packed, lut, bits, group_size, bias)


def _stamp(t: Tensor) -> tuple:
    """Identity and in-place version of a tensor: changes when it is replaced or written into."""
    return t.data_ptr(), t.shape, t.dtype, None if t.is_inference() else t._version


def _cpu_weight(cache: dict | None, packed: Tensor, scale: Tensor, zero: Tensor, bits: int, group_size: int,
                cols: int) -> dict:
    stamp = (_stamp(packed), _stamp(scale), _stamp(zero), bits, group_size, cols)
    if cache is not None and cache.get("stamp") == stamp:
        return cache["weight"]
    prepared = cpu.prepare(packed, scale, zero, bits, group_size, cols)
    if cache is not None:
        cache.update(stamp=stamp, weight=prepared)
    return prepared
