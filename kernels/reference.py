"""Pure-torch definitions of the kernels: what a fast kernel must compute, on any device."""

from __future__ import annotations

import torch
from torch import Tensor

from compress.pack import dequantize, dequantize_fp4, lut_dequantize, unpack_24, unpack_codes

E4M3_MAX = 448.0  # largest finite float8_e4m3fn


def quant_linear(
    x: Tensor,
    packed: Tensor,
    scale: Tensor,
    zero: Tensor,
    bits: int,
    group_size: int,
    bias: Tensor | None = None,
    g_idx: Tensor | None = None,
) -> Tensor:
    """y = x Ŵᵀ + b with Ŵ = (q − zero) · scale, q unpacked from `packed`.

    Args:
        x: [..., in] activations. packed: int32 [out, ceil(in·bits/32)] (compress.pack layout).
        scale: [out, ceil(in/group_size)] (float16). zero: same shape, integer codes (uint8).
        group_size: inputs per group, -1 for one group per row; the last group may be shorter.
        g_idx: optional int [in], the group of each input (act-order checkpoints of other tools);
            it replaces `group_size` when given.
    Ŵ is built in fp32 and rounded once to x.dtype; the product runs in x.dtype.
    """
    cols = x.shape[-1]
    codes = unpack_codes(packed, bits, cols)
    if g_idx is None:
        W = dequantize(codes, scale, zero, group_size)
    else:
        g = g_idx.long()
        W = (codes.float() - zero.float()[:, g]) * scale.float()[:, g]
    return torch.nn.functional.linear(x, W.to(x.dtype), bias)


def sparse24_linear(x: Tensor, values: Tensor, meta: Tensor, bias: Tensor | None = None) -> Tensor:
    """y = x Wᵀ + b with W = unpack_24(values, meta) (compress.pack layout).

    Args:
        x: [..., in] activations. values: [out, in/2] kept weights. meta: int32 [out, ceil(in/32)].
    """
    W = unpack_24(values, meta)
    if W.shape[1] != x.shape[-1]:
        raise ValueError(f"x has {x.shape[-1]} inputs, the 2:4 weight {W.shape[1]}")
    return torch.nn.functional.linear(x, W.to(x.dtype), bias)


def lut_linear(x: Tensor, packed: Tensor, lut: Tensor, bits: int, group_size: int, bias: Tensor | None = None
               ) -> Tensor:
    """y = x Ŵᵀ + b with Ŵ[o, j] = lut[o, j // group_size, q[o, j]], q unpacked from `packed`
    (non-uniform codes, compress.nonuniform).

    Args:
        x: [..., in] activations. packed: int32 [out, ceil(in·bits/32)] (compress.pack layout).
        lut: [out, n_groups, 2^bits] levels (float16). group_size: inputs per table, -1 for one per row.
    Ŵ is built in fp32 and rounded once to x.dtype; the product runs in x.dtype.
    """
    codes = unpack_codes(packed, bits, x.shape[-1])
    W = lut_dequantize(codes, lut, group_size)
    return torch.nn.functional.linear(x, W.to(x.dtype), bias)


def fp8_quantize_per_token(x: Tensor) -> tuple[Tensor, Tensor]:
    """Dynamic per-token E4M3 codes of x [..., K]: (q float8_e4m3fn [..., K], scale fp32 [..., 1]), x ≈ q · scale.

    scale = amax / 448 per row, so each row's largest |x| lands on ±448 and uses the whole range; it is
    floored at 2^-126 so an all-zero row divides by a normal number. x / scale is clamped to ±448
    because torch turns an out-of-range value into NaN (e4m3fn has no infinity), not into 448.
    """
    xf = x.float()
    scale = (xf.abs().amax(-1, keepdim=True) / E4M3_MAX).clamp(min=2.0**-126)
    return (xf / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn), scale


def fp8_scaled_mm(a_q: Tensor, a_scale: Tensor, w_q: Tensor, w_scale: Tensor, bias: Tensor | None = None,
                  out_dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """y = (A_q · W_qᵀ) · a_scale · w_scaleᵀ + b, the W8A8 GEMM, in fp32 rounded once to out_dtype.

    Args:
        a_q: float8_e4m3fn [M, K]; a_scale fp32 [M, 1] per token, or one element (per tensor).
        w_q: float8_e4m3fn [N, K]; w_scale fp32 [N, 1] per output channel, or one element.
    The products of two e4m3 values are exact in fp32, so only the order of the fp32 sum is free.
    """
    acc = a_q.float() @ w_q.float().t()
    y = acc * a_scale.float().reshape(-1, 1) * w_scale.float().reshape(1, -1)
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)


def fp8_linear(x: Tensor, w_q: Tensor, w_scale: Tensor, bias: Tensor | None = None) -> Tensor:
    """The W8A8 op fed from 16-bit x [..., K]: x -> per-token e4m3 fake quant (fp8_quantize_per_token),
    times the dequantized weight Ŵ = w_q · w_scale, all in fp32, rounded once to x.dtype."""
    q, s = fp8_quantize_per_token(x)
    W = w_q.float() * w_scale.float().reshape(-1, 1)
    y = torch.nn.functional.linear(q.float() * s, W, None if bias is None else bias.float())
    return y.to(x.dtype)


def fp4_linear(x: Tensor, packed: Tensor, scale: Tensor, global_scale: Tensor | None, group_size: int,
               bias: Tensor | None = None) -> Tensor:
    """y = x Ŵᵀ + b with Ŵ = compress.pack.dequantize_fp4(...) (NVFP4 or MXFP4, compressed-tensors layout).

    Args:
        x: [..., K] activations. packed: uint8 [N, K/2]. scale: float8_e4m3fn [N, K/16] with a one-element
            fp32 global_scale (NVFP4), or uint8 E8M0 [N, K/32] with global_scale None (MXFP4).
    Ŵ is built in fp32 and rounded once to x.dtype; the product runs in x.dtype.
    """
    W = dequantize_fp4(packed, scale, global_scale, group_size, x.shape[-1])
    return torch.nn.functional.linear(x, W.to(x.dtype), bias)
