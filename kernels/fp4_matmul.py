"""Triton FP4-weight GEMM with 16-bit activations: y = x Ŵᵀ + b, Ŵ decoded in registers from
compressed-tensors NVFP4 / MXFP4 tensors.

Computes what kernels/reference.py `fp4_linear` defines (Ŵ as compress.pack.dequantize_fp4). Shapes:

    x        [M, K] fp16, bf16 or fp32 (leading dims flattened into M), any strides
    packed   uint8 [N, K/2]: byte j of a row holds E2M1 codes of columns 2j (low nibble) and 2j+1 (high)
    MX=False NVFP4: scale float8_e4m3fn [N, K/16], global_scale fp32 [1]; s = float(scale) / global_scale
    MX=True  MXFP4: scale uint8 [N, K/32] E8M0; s = 2^(scale − 127)
    out      [M, N] in x.dtype

A code c decodes without a table: the magnitude m = c & 7 is 0, 0.5 (m = 1) or 2^((m>>1) − 1)·(1 + (m&1)/2)
(m ≥ 2), whose fp32 bits are built directly, and bit 3 of c becomes bit 31. Ŵ = e2m1 · s in fp32
(the division by the global scale rounded as torch's: tl.math.div_rn), rounded to x.dtype as the
reference rounds Ŵ, and fed to tl.dot with an fp32 accumulator. The weight tile [BLOCK_K, BLOCK_N] is
loaded per k: neighbouring k rows read the same byte and scale, from cache. Tiling, split-K, the
epilogue (bias in fp32, one rounding) and autotuning as in fp8_matmul.py. Triton 3.9's interpreter
decodes the e4m3 NaN byte 0x7F as 480, so NaN NVFP4 scales only decode as NaN on a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .fp8_matmul import launch, output_buffer
from .quant_matmul import INTERPRET, _dot_f32, _prune, tile_ids

GROUP_SIZE = {torch.float8_e4m3fn: 16, torch.uint8: 32}  # NVFP4, MXFP4


def _autotune_configs() -> list[triton.Config]:
    if INTERPRET:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4, "SPLIT_K": 1})]
    decode = [
        triton.Config({"BLOCK_M": 16, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 1, "SPLIT_K": sk}, num_warps=4,
                      num_stages=4)
        for bn in (32, 64, 128) for bk in (64, 128, 256) for sk in (1, 2, 4, 8)
    ]
    prefill = [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8, "SPLIT_K": 1}, num_warps=w,
                      num_stages=s)
        for bm, bn, bk, w, s in [(32, 64, 64, 4, 4), (64, 64, 64, 4, 4), (64, 128, 32, 4, 4), (128, 128, 32, 8, 3),
                                 (128, 64, 64, 4, 4), (128, 256, 32, 8, 3), (128, 128, 64, 8, 3)]
    ]
    return decode + prefill


@triton.autotune(configs=_autotune_configs(), key=["M_BUCKET", "N", "K", "MX", "HAS_BIAS", "DOT_F32"],
                 prune_configs_by={"early_config_prune": _prune}, reset_to_zero=["out_ptr"], cache_results=True)
@triton.jit
def _fp4_matmul_kernel(
    # tensors: x [M, K], packed uint8 [N, K/2], scale [N, K/GROUP], global_scale fp32 [1], bias [N], out [M, N]
    x_ptr, packed_ptr, scale_ptr, gscale_ptr, bias_ptr, out_ptr,
    # sizes (M_BUCKET: M rounded up to a power of two, the autotuning key)
    M, N, K, M_BUCKET,
    # strides
    stride_xm, stride_xk, stride_pn, stride_pk, stride_sn, stride_sg, stride_om, stride_on,
    # what is computed
    GROUP: tl.constexpr, MX: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_F32: tl.constexpr,
    # how it is tiled
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    SPLIT_K: tl.constexpr,
):
    pid_m, pid_n = tile_ids(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    pid_k = tl.program_id(1)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    if not MX:
        gs = tl.load(gscale_ptr)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(pid_k * BLOCK_K, K, BLOCK_K * SPLIT_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        a = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)  # [BLOCK_M, BLOCK_K]
        mask_w = mask_k[:, None] & mask_n[None, :]
        byte = tl.load(packed_ptr + offs_n[None, :] * stride_pn + (offs_k // 2)[:, None] * stride_pk,
                       mask=mask_w, other=0).to(tl.int32)  # [BLOCK_K, BLOCK_N]
        code = (byte >> ((offs_k % 2) * 4)[:, None]) & 0xF  # even k: low nibble
        m = code & 7
        bits = tl.where(m >= 2, (((m >> 1) + 126) << 23) | ((m & 1) << 22), tl.where(m == 1, 0x3F000000, 0))
        e2m1 = (bits | ((code & 8) << 28)).to(tl.float32, bitcast=True)
        s_ptr = scale_ptr + offs_n[None, :] * stride_sn + (offs_k // GROUP)[:, None] * stride_sg
        if MX:  # E8M0: 2^(e − 127) from the bits; 0 is the subnormal 2^-127, 255 NaN (masked: 127, i.e. 1.0)
            e = tl.load(s_ptr, mask=mask_w, other=127).to(tl.int32)
            sbits = tl.where(e == 0, 0x00400000, tl.where(e == 255, 0x7FC00000, e << 23))
            s = sbits.to(tl.float32, bitcast=True)
        else:
            s = tl.math.div_rn(tl.load(s_ptr, mask=mask_w, other=0.0).to(tl.float32), gs)
        w = (e2m1 * s).to(x_ptr.dtype.element_ty)  # Ŵᵀ tile
        if DOT_F32:  # see quant_matmul._dot_f32
            acc = tl.dot(a.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, w, acc)
    y = acc
    if HAS_BIAS:
        b = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        y += tl.where(pid_k == 0, b, 0.0)[None, :]  # once, not once per split-K share
    out = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    mask = mask_m[:, None] & mask_n[None, :]
    if SPLIT_K == 1:
        tl.store(out, y.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.atomic_add(out, y, mask=mask)


def check_fp4_args(x: Tensor, packed: Tensor, scale: Tensor, global_scale: Tensor | None, group_size: int) -> None:
    """ValueError unless the tensors have the shapes and dtypes of reference.fp4_linear's NVFP4 or MXFP4."""
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"x must be float16, bfloat16 or float32, got {x.dtype}")
    if scale.dtype not in GROUP_SIZE:
        raise ValueError(f"scale must be float8_e4m3fn (NVFP4) or uint8 (MXFP4), got {scale.dtype}")
    K, mx = x.shape[-1], scale.dtype == torch.uint8
    if group_size != GROUP_SIZE[scale.dtype] or K % group_size:
        raise ValueError(f"{'MXFP4' if mx else 'NVFP4'} takes group_size {GROUP_SIZE[scale.dtype]} and K a "
                         f"multiple of it, got group_size {group_size}, K {K}")
    N = packed.shape[0]
    if packed.dtype != torch.uint8 or packed.dim() != 2 or packed.shape[1] * 2 != K:
        raise ValueError(f"packed must be uint8 [N, {K // 2}] for {K} inputs, got {packed.dtype} "
                         f"{tuple(packed.shape)}")
    if scale.shape != (N, K // group_size):
        raise ValueError(f"scale must be [{N}, {K // group_size}], got {tuple(scale.shape)}")
    if mx != (global_scale is None) or not (mx or (global_scale.numel() == 1 and global_scale.dtype == torch.float32)):
        raise ValueError("global_scale must be a one-element float32 tensor for NVFP4 and None for MXFP4")


def fp4_matmul(x: Tensor, packed: Tensor, scale: Tensor, global_scale: Tensor | None, group_size: int,
               bias: Tensor | None = None, config: dict | None = None) -> Tensor:
    """Triton fp4_linear: [..., K] -> [..., N] in x.dtype (same arguments as the reference).

    config: launch these meta-parameters instead of autotuning (see fp8_matmul).
    """
    check_fp4_args(x, packed, scale, global_scale, group_size)
    K, N = x.shape[-1], packed.shape[0]
    if bias is not None and bias.shape != (N,):
        raise ValueError(f"bias must be [{N}], got {tuple(bias.shape)}")
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    out = output_buffer(M, N, x.dtype, x.device, config)
    if M and N:
        mx = global_scale is None
        args = (x2, packed, scale, scale if mx else global_scale, packed if bias is None else bias, out, M, N, K,
                triton.next_power_of_2(M), x2.stride(0), x2.stride(1), packed.stride(0), packed.stride(1),
                scale.stride(0), scale.stride(1), out.stride(0), out.stride(1))
        flags = {"GROUP": group_size, "MX": mx, "HAS_BIAS": bias is not None, "DOT_F32": _dot_f32(x.dtype)}
        launch(_fp4_matmul_kernel, args, flags, M, N, config)
    return out.to(x.dtype).reshape(*x.shape[:-1], N)
