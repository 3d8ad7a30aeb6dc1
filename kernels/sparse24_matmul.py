"""Triton 2:4 sparse GEMM: y = x Wᵀ + b, with W rebuilt in registers from compress.pack.pack_24 storage.

Computes exactly what kernels/reference.py `sparse24_linear` defines. Shapes and layout:

    x       [M, K]  fp16, bf16 or fp32 (leading dims flattened into M), K a multiple of 4
    values  [N, K/2] the two kept weights of each group of 4 inputs, in position order
    meta    int32 [N, ceil(K/32)]: the 2-bit position of each kept weight, 16 per word, LSB first;
            group j (inputs 4j..4j+3) has slots 2j, 2j+1, so its positions are bits 4(j%8) .. 4(j%8)+3
            of word j // 8: input k reads word k // 32 at shift (k % 32) − (k % 4)
    out     fp32 [M, N], zeroed; the wrapper adds the bias in fp32 and rounds once to x.dtype

The weight tile [BLOCK_K, BLOCK_N] is rebuilt densely: input k takes slot 2j's value where that slot's
position is k % 4, slot 2j+1's where its is, else 0. Reads from memory are the compressed bytes
(9 bits per weight at fp16); the dot itself is dense, as no sparse tensor-core path is used, so the
gain is bandwidth only (decode), not FLOPs. Tiling, split-K and autotuning as in quant_matmul.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .quant_matmul import INTERPRET, _dot_f32, _prune, tile_ids


def _autotune_configs() -> list[triton.Config]:
    if INTERPRET:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4, "SPLIT_K": 1})]
    decode = [
        triton.Config({"BLOCK_M": 16, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 1, "SPLIT_K": sk}, num_warps=4,
                      num_stages=4)
        for bn in (32, 64, 128) for bk in (64, 128) for sk in (1, 2, 4, 8)
    ]
    prefill = [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8, "SPLIT_K": 1}, num_warps=w,
                      num_stages=s)
        for bm, bn, bk, w, s in [(32, 64, 64, 4, 4), (64, 64, 64, 4, 4), (64, 128, 32, 4, 4), (128, 128, 32, 8, 3),
                                 (128, 64, 64, 4, 4), (128, 256, 32, 8, 3)]
    ]
    return decode + prefill


@triton.autotune(configs=_autotune_configs(), key=["M_BUCKET", "N", "K", "DOT_F32"],
                 prune_configs_by={"early_config_prune": _prune}, reset_to_zero=["out_ptr"], cache_results=True)
@triton.jit
def _sparse24_matmul_kernel(
    # tensors: x [M, K], values [N, K/2], meta int32 [N, ceil(K/32)], out fp32 [M, N]
    x_ptr, values_ptr, meta_ptr, out_ptr,
    # sizes
    M, N, K, M_BUCKET,
    # strides
    stride_xm, stride_xk, stride_vn, stride_vk, stride_mn, stride_mw, stride_om, stride_on,
    # what is computed
    DOT_F32: tl.constexpr,
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
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(pid_k * BLOCK_K, K, BLOCK_K * SPLIT_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        a = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)  # [BLOCK_M, BLOCK_K]
        mask_w = mask_k[:, None] & mask_n[None, :]
        slot = (offs_k // 4) * 2  # first slot of input k's group
        v_ptr = values_ptr + offs_n[None, :] * stride_vn + slot[:, None] * stride_vk
        v0 = tl.load(v_ptr, mask=mask_w, other=0.0)  # [BLOCK_K, BLOCK_N]
        v1 = tl.load(v_ptr + stride_vk, mask=mask_w, other=0.0)
        word = tl.load(meta_ptr + offs_n[None, :] * stride_mn + (offs_k // 32)[:, None] * stride_mw,
                       mask=mask_w, other=0)
        shift = ((offs_k % 32) - (offs_k % 4))[:, None]
        pos = (offs_k % 4)[:, None]
        i0 = (word >> shift) & 3
        i1 = (word >> (shift + 2)) & 3
        w = tl.where(i0 == pos, v0, tl.where(i1 == pos, v1, 0.0)).to(x_ptr.dtype.element_ty)  # Wᵀ tile
        if DOT_F32:  # see quant_matmul._dot_f32
            acc = tl.dot(a.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, w, acc)
    out = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    mask = mask_m[:, None] & mask_n[None, :]
    if SPLIT_K == 1:
        tl.store(out, acc, mask=mask)
    else:
        tl.atomic_add(out, acc, mask=mask)


def sparse24_matmul(x: Tensor, values: Tensor, meta: Tensor, bias: Tensor | None = None,
                    config: dict | None = None) -> Tensor:
    """Triton sparse24_linear: [..., K] -> [..., N] in x.dtype (same arguments as the reference).

    config: launch these meta-parameters instead of autotuning (see quant_matmul).
    """
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"x must be float16, bfloat16 or float32, got {x.dtype}")
    K, (N, half) = x.shape[-1], values.shape
    if K % 4 or half * 2 != K:
        raise ValueError(f"values must be [out, {K // 2}] for {K} inputs (a multiple of 4), got {tuple(values.shape)}")
    if meta.dtype != torch.int32 or meta.shape != (N, -(-K // 32)):
        raise ValueError(f"meta must be int32 [{N}, {-(-K // 32)}], got {meta.dtype} {tuple(meta.shape)}")
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    out = torch.zeros(M, N, dtype=torch.float32, device=x.device)
    if M and N:
        args = (x2, values, meta, out, M, N, K, triton.next_power_of_2(M), x2.stride(0), x2.stride(1),
                values.stride(0), values.stride(1), meta.stride(0), meta.stride(1), out.stride(0), out.stride(1))

        def grid(meta_):
            return (triton.cdiv(M, meta_["BLOCK_M"]) * triton.cdiv(N, meta_["BLOCK_N"]), meta_["SPLIT_K"])

        if config is None:
            _sparse24_matmul_kernel[grid](*args, DOT_F32=_dot_f32(x.dtype))
        else:
            _sparse24_matmul_kernel.fn[grid](*args, DOT_F32=_dot_f32(x.dtype), **config)
    if bias is not None:
        out += bias.float()
    return out.to(x.dtype).reshape(*x.shape[:-1], N)
