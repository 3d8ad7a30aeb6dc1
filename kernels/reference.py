"""Pure-torch definitions of the kernels: what a fast kernel must compute, on any device."""

from __future__ import annotations

import torch
from torch import Tensor

from compress.pack import dequantize, lut_dequantize, unpack_24, unpack_codes


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
