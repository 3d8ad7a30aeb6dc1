"""Triton W4A16 / W8A16 GEMM: y = x Ŵᵀ + b, with Ŵ dequantized in registers from compress.pack words.

Computes exactly what kernels/reference.py `quant_linear` defines, on a CUDA tensor (or a CPU one
under TRITON_INTERPRET=1). Shapes and layout:

    x       [M, K]   fp16, bf16 or fp32 (any leading dims are flattened into M), any strides
    packed  int32 [N, ceil(K·BITS/32)], BITS 4 or 8, P = 32/BITS codes per word, LSB first:
                word [n, w] = c[n, wP + P−1] ... c[n, wP + 1] c[n, wP]     (c[n, k] is BITS bits wide)
    scale   [N, n_groups] float (float16 as we store it); zero [N, n_groups] uint8
            the group of input k is k // group_size (group_size −1: one group), or g_idx[k] when given
    out     fp32 [M, N], zeroed: the wrapper adds the bias in fp32 and rounds once to x.dtype

Each program owns a [BLOCK_M, BLOCK_N] tile of y and a 1/SPLIT_K share of K (K tiles pid_k,
pid_k + SPLIT_K, ...). SPLIT_K > 1 adds the shares with fp32 atomics: at decode (M ≤ 16) there are
too few output tiles to fill the GPU, so K is split instead (the GEMV case). The weight tile
[BLOCK_K, BLOCK_N] is loaded as words (neighbouring k rows read the same word, from cache),
shifted and masked to codes, dequantized in fp32 as (q − zero)·scale, rounded to x.dtype as the
reference rounds Ŵ, and fed to tl.dot with an fp32 accumulator.

Autotuning is keyed on (M rounded up to a power of two, N, K, ...): a prompt of 37 tokens reuses
the tuning of 64 instead of timing every config again. Timings are cached on disk
(`cache_results=True`, under TRITON_CACHE_DIR, default ~/.triton/cache) next to the compiled
binaries, so only the first call of a shape on a machine pays for tuning and compiling (seconds);
`python -m compress.kernels.bench` warms the cache for 7B-class shapes.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _autotune_configs() -> list[triton.Config]:
    if INTERPRET:  # the interpreter runs each config in numpy: tuning would only cost time
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4, "SPLIT_K": 1})]
    decode = [  # M ≤ 16: one row tile, split K to fill the SMs
        triton.Config({"BLOCK_M": 16, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 1, "SPLIT_K": sk}, num_warps=4,
                      num_stages=4)
        for bn in (32, 64, 128) for bk in (64, 128, 256) for sk in (1, 2, 4, 8)
    ]
    prefill = [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8, "SPLIT_K": 1}, num_warps=w,
                      num_stages=s)
        for bm, bn, bk, w, s in [(32, 64, 64, 4, 4), (64, 64, 64, 4, 4), (64, 128, 32, 4, 4), (128, 128, 32, 8, 3),
                                 (128, 64, 64, 4, 4), (128, 256, 32, 8, 3), (64, 256, 32, 8, 3)]
    ]
    return decode + prefill


def _prune(configs, named_args, **kwargs):
    """Decode shapes try only the 16-row tiles, larger M only the prefill tiles."""
    small = named_args["M_BUCKET"] <= 16
    return [c for c in configs if (c.kwargs["BLOCK_M"] == 16) == small] or configs


@triton.jit
def tile_ids(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(row tile, column tile) of program `pid` in grouped ordering: GROUP_M row tiles in a row walk
    the same weight columns, so the weight tiles hit L2."""
    num_pid_n = tl.cdiv(N, BLOCK_N)
    in_group = GROUP_M * num_pid_n
    first_m = (pid // in_group) * GROUP_M
    rows = tl.minimum(tl.cdiv(M, BLOCK_M) - first_m, GROUP_M)
    return first_m + (pid % in_group) % rows, (pid % in_group) // rows


@triton.autotune(configs=_autotune_configs(), key=["M_BUCKET", "N", "K", "BITS", "HAS_G_IDX", "DOT_F32"],
                 prune_configs_by={"early_config_prune": _prune}, reset_to_zero=["out_ptr"], cache_results=True)
@triton.jit
def _quant_matmul_kernel(
    # tensors: x [M, K], packed int32 [N, words], scale / zero [N, n_groups], g_idx int32 [K], out fp32 [M, N]
    x_ptr, packed_ptr, scale_ptr, zero_ptr, g_idx_ptr, out_ptr,
    # sizes (M_BUCKET: M rounded up to a power of two, the autotuning key)
    M, N, K, M_BUCKET, group_size,
    # strides
    stride_xm, stride_xk, stride_pn, stride_pw, stride_sn, stride_sg, stride_zn, stride_zg, stride_om, stride_on,
    # what is computed
    BITS: tl.constexpr, HAS_G_IDX: tl.constexpr, DOT_F32: tl.constexpr,
    # how it is tiled
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    SPLIT_K: tl.constexpr,
):
    PER_WORD: tl.constexpr = 32 // BITS
    MAXQ: tl.constexpr = (1 << BITS) - 1
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
        words = tl.load(packed_ptr + offs_n[None, :] * stride_pn + (offs_k // PER_WORD)[:, None] * stride_pw,
                        mask=mask_w, other=0)  # [BLOCK_K, BLOCK_N]
        q = (words >> ((offs_k % PER_WORD) * BITS)[:, None]) & MAXQ  # sign-extended shift, masked back to BITS
        if HAS_G_IDX:
            g = tl.load(g_idx_ptr + offs_k, mask=mask_k, other=0)
        else:
            g = offs_k // group_size
        s = tl.load(scale_ptr + offs_n[None, :] * stride_sn + g[:, None] * stride_sg, mask=mask_w, other=0.0)
        z = tl.load(zero_ptr + offs_n[None, :] * stride_zn + g[:, None] * stride_zg, mask=mask_w, other=0)
        w = ((q.to(tl.float32) - z.to(tl.float32)) * s.to(tl.float32)).to(x_ptr.dtype.element_ty)  # Ŵᵀ tile
        if DOT_F32:  # fp32 activations (exact products), or bf16 under the interpreter (see _dot_f32)
            acc = tl.dot(a.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, w, acc)
    out = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    mask = mask_m[:, None] & mask_n[None, :]
    if SPLIT_K == 1:
        tl.store(out, acc, mask=mask)
    else:
        tl.atomic_add(out, acc, mask=mask)


def _dot_f32(dtype: torch.dtype) -> bool:
    """Feed tl.dot fp32 operands: for fp32 x (no TF32, as torch's default matmul), and for bf16 under
    TRITON_INTERPRET, whose numpy tl.dot multiplies bf16 bit patterns as uint16 (triton 3.9
    interpreter.create_dot). The operands are bf16 values either way, so the result is the same."""
    return dtype == torch.float32 or (INTERPRET and dtype == torch.bfloat16)


def check_quant_args(x: Tensor, packed: Tensor, scale: Tensor, zero: Tensor, bits: int, group_size: int,
                     g_idx: Tensor | None) -> None:
    """ValueError unless the tensors have the shapes and dtypes of kernels/reference.py quant_linear."""
    K = x.shape[-1]
    N = packed.shape[0]
    if packed.dtype != torch.int32 or packed.dim() != 2 or packed.shape[1] != -(-K * bits // 32):
        raise ValueError(f"packed must be int32 [out, {-(-K * bits // 32)}] for {K} inputs of {bits} bits, "
                         f"got {packed.dtype} {tuple(packed.shape)}")
    if g_idx is None:
        if group_size != -1 and group_size < 1:
            raise ValueError(f"group_size must be -1 or positive, got {group_size}")
        groups = 1 if group_size == -1 else -(-K // group_size)
    else:
        if g_idx.shape != (K,):
            raise ValueError(f"g_idx must be [{K}], got {tuple(g_idx.shape)}")
        groups = scale.shape[-1]
    if scale.shape != (N, groups) or zero.shape != (N, groups):
        raise ValueError(f"scale and zero must be [{N}, {groups}], got {tuple(scale.shape)} and {tuple(zero.shape)}")


def quant_matmul(x: Tensor, packed: Tensor, scale: Tensor, zero: Tensor, bits: int, group_size: int,
                 bias: Tensor | None = None, g_idx: Tensor | None = None, config: dict | None = None) -> Tensor:
    """Triton quant_linear: [..., K] -> [..., N] in x.dtype (same arguments as the reference).

    config: launch these meta-parameters (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, SPLIT_K, and optionally
    num_warps) instead of autotuning; for tests and A/B benchmarks.
    """
    if bits not in (4, 8):
        raise ValueError(f"the Triton kernel takes 4- or 8-bit codes, got {bits}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"x must be float16, bfloat16 or float32, got {x.dtype}")
    check_quant_args(x, packed, scale, zero, bits, group_size, g_idx)
    K, N = x.shape[-1], packed.shape[0]
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    out = torch.zeros(M, N, dtype=torch.float32, device=x.device)
    if M and N:
        gi = g_idx.to(torch.int32).contiguous() if g_idx is not None else packed  # an unread placeholder
        args = (x2, packed, scale, zero, gi, out, M, N, K, triton.next_power_of_2(M),
                K if group_size == -1 else group_size,
                x2.stride(0), x2.stride(1), packed.stride(0), packed.stride(1), scale.stride(0), scale.stride(1),
                zero.stride(0), zero.stride(1), out.stride(0), out.stride(1))
        flags = {"BITS": bits, "HAS_G_IDX": g_idx is not None, "DOT_F32": _dot_f32(x.dtype)}

        def grid(meta):
            return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]), meta["SPLIT_K"])

        if config is None:
            _quant_matmul_kernel[grid](*args, **flags)
        else:
            _quant_matmul_kernel.fn[grid](*args, **flags, **config)
    if bias is not None:
        out += bias.float()
    return out.to(x.dtype).reshape(*x.shape[:-1], N)
