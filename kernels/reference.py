"""Pure-torch definitions of the kernels: what a fast kernel must compute, on any device."""

from __future__ import annotations

import torch
from torch import Tensor

from compress.pack import unpack_codes
from compress.quantize import dequantize


def quant_linear(
    x: Tensor,
    packed: Tensor,
    scale: Tensor,
    zero: Tensor,
    bits: int,
    group_size: int,
    bias: Tensor | None = None,
) -> Tensor:
    """y = x Ŵᵀ + b with Ŵ = (q − zero) · scale, q unpacked from `packed`.

    Args:
        x: [..., in] activations. packed: int32 [out, ceil(in·bits/32)] (compress.pack layout).
        scale: [out, ceil(in/group_size)] (float16). zero: same shape, integer codes (uint8).
        group_size: inputs per group, -1 for one group per row; the last group may be shorter.
    """
    cols = x.shape[-1]
    W = dequantize(unpack_codes(packed, bits, cols), scale, zero, group_size)
    return torch.nn.functional.linear(x, W.to(x.dtype), bias)
