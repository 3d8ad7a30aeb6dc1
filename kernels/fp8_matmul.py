"""Triton FP8 W8A8 GEMM: y = (A_q · W_qᵀ) · a_scale · w_scaleᵀ + b, on float8_e4m3fn codes.

Computes what kernels/reference.py `fp8_scaled_mm` defines (and, through its per-token quantizer,
`fp8_linear`). Shapes:

    a_q      float8_e4m3fn [M, K], any strides;  a_scale fp32 [M, 1] per token, or one element
    w_q      float8_e4m3fn [N, K], any strides;  w_scale fp32 [N, 1] per output channel, or one element
    bias     [N] (any float dtype, added in fp32), optional
    out      [M, N] in out_dtype (bf16, fp16 or fp32)

Tiling, grouped tile order, split-K and autotuning as in quant_matmul.py. The inner product is a
tl.dot on the fp8 tiles with an fp32 accumulator (FP8_DOT). Hopper's fp8 MMA sums inside a
reduced-precision accumulator, so max_num_imprecise_acc=BLOCK_K moves the partial sum into the fp32
one once per K tile (Triton's sm_90 default never does). GPUs without fp8 MMA (before sm_89) take
FP8_DOT=False: the same body up-casts both tiles to fp16, which holds every e4m3 value exactly, and
runs an fp16 dot with fp32 accumulation: the same products, the same sums.

The epilogue scales the fp32 tile by a_scale (rows) and w_scale (columns), adds the bias and rounds
once to out_dtype. At decode (M ≤ 16) the output is an fp32 buffer so split-K shares can be added
with atomics (the bias by share 0 only); the wrapper rounds it after.

Under TRITON_INTERPRET=1 (triton 3.9) fp8 tl.dot works: the interpreter widens both fp8 operands to
fp16 (exactly) and multiplies in numpy with an fp32 result, so the tests run the FP8_DOT=True path,
and the fp16 path by asking for it (config={"FP8_DOT": False}). The interpreter's own fp32 -> fp8
cast rounds wrongly (31.4 -> 16), which is one more reason the activation quantizer
(reference.fp8_quantize_per_token) is torch code and the kernel never casts to fp8.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .quant_matmul import INTERPRET, _prune, tile_ids
from .reference import fp8_quantize_per_token

OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _autotune_configs() -> list[triton.Config]:
    if INTERPRET:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4, "SPLIT_K": 1})]
    decode = [
        triton.Config({"BLOCK_M": 16, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 1, "SPLIT_K": sk}, num_warps=4,
                      num_stages=4)
        for bn in (32, 64, 128) for bk in (128, 256) for sk in (1, 2, 4, 8)
    ]
    prefill = [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8, "SPLIT_K": 1}, num_warps=w,
                      num_stages=s)
        for bm, bn, bk, w, s in [(64, 64, 128, 4, 4), (64, 128, 128, 4, 4), (128, 64, 128, 4, 4),
                                 (128, 128, 128, 8, 3), (128, 256, 128, 8, 3), (256, 128, 128, 8, 3),
                                 (128, 128, 64, 4, 4)]
    ]
    return decode + prefill


@triton.autotune(configs=_autotune_configs(), key=["M_BUCKET", "N", "K", "HAS_BIAS", "FP8_DOT"],
                 prune_configs_by={"early_config_prune": _prune}, reset_to_zero=["out_ptr"], cache_results=True)
@triton.jit
def _fp8_matmul_kernel(
    # tensors: a [M, K] fp8, w [N, K] fp8, a_scale [M or 1], w_scale [N or 1] fp32, bias [N], out [M, N]
    a_ptr, w_ptr, a_scale_ptr, w_scale_ptr, bias_ptr, out_ptr,
    # sizes (M_BUCKET: M rounded up to a power of two, the autotuning key)
    M, N, K, M_BUCKET,
    # strides (a scale's is 0 when it is per tensor)
    stride_am, stride_ak, stride_wn, stride_wk, stride_asm, stride_wsn, stride_om, stride_on,
    # what is computed
    HAS_BIAS: tl.constexpr, FP8_DOT: tl.constexpr,
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
        a = tl.load(a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)  # [BLOCK_M, BLOCK_K]
        w = tl.load(w_ptr + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk,
                    mask=mask_k[:, None] & mask_n[None, :], other=0.0)  # W_qᵀ tile [BLOCK_K, BLOCK_N]
        if FP8_DOT:
            acc = tl.dot(a, w, acc, max_num_imprecise_acc=BLOCK_K)
        else:  # exact widening: e4m3 ⊂ fp16
            acc = tl.dot(a.to(tl.float16), w.to(tl.float16), acc)
    s_a = tl.load(a_scale_ptr + offs_m * stride_asm, mask=mask_m, other=0.0)
    s_w = tl.load(w_scale_ptr + offs_n * stride_wsn, mask=mask_n, other=0.0)
    y = acc * s_a[:, None] * s_w[None, :]
    if HAS_BIAS:
        b = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        y += tl.where(pid_k == 0, b, 0.0)[None, :]  # once, not once per split-K share
    out = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    mask = mask_m[:, None] & mask_n[None, :]
    if SPLIT_K == 1:
        tl.store(out, y.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.atomic_add(out, y, mask=mask)


def _fp8_dot(device: torch.device) -> bool:
    """fp8 MMA exists from sm_89 (Ada, Hopper, Blackwell); the interpreter runs fp8 dots too."""
    return INTERPRET or device.type != "cuda" or torch.cuda.get_device_capability(device) >= (8, 9)


def output_buffer(M: int, N: int, dtype: torch.dtype, device: torch.device, config: dict | None) -> Tensor:
    """fp32 zeros where split-K may add shares atomically (decode rows when autotuned, or a config that
    splits), else an uninitialised [M, N] in the output dtype, written once by the epilogue."""
    split = config.get("SPLIT_K", 1) > 1 if config else triton.next_power_of_2(M) <= 16
    return torch.zeros(M, N, dtype=torch.float32, device=device) if split else torch.empty(M, N, dtype=dtype,
                                                                                          device=device)


def launch(kernel, args: tuple, flags: dict, M: int, N: int, config: dict | None) -> None:
    """Autotuned launch, or the given meta-parameters (config may also override a flag)."""
    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]), meta["SPLIT_K"])

    if config is None:
        kernel[grid](*args, **flags)
    else:
        kernel.fn[grid](*args, **{**flags, **config})


def _scale_stride(scale: Tensor, rows: int, name: str) -> int:
    """0 for one scale (per tensor), 1 for [rows, 1] or [rows] (per row); ValueError otherwise."""
    if scale.dtype != torch.float32:
        raise ValueError(f"{name} must be float32, got {scale.dtype}")
    if scale.numel() == 1 and scale.dim() <= 2:
        return 0
    if scale.shape in ((rows, 1), (rows,)):
        return scale.stride(0)
    raise ValueError(f"{name} must be [{rows}, 1] or one element, got {tuple(scale.shape)}")


def fp8_matmul(a_q: Tensor, a_scale: Tensor, w_q: Tensor, w_scale: Tensor, bias: Tensor | None = None,
               out_dtype: torch.dtype = torch.bfloat16, config: dict | None = None) -> Tensor:
    """Triton fp8_scaled_mm: A_q [M, K], W_q [N, K] -> [M, N] in out_dtype (same arguments as the reference).

    config: launch these meta-parameters (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, SPLIT_K, optionally
    num_warps and FP8_DOT) instead of autotuning; for tests and A/B benchmarks.
    """
    if a_q.dtype != torch.float8_e4m3fn or w_q.dtype != torch.float8_e4m3fn:
        raise ValueError(f"a_q and w_q must be float8_e4m3fn, got {a_q.dtype} and {w_q.dtype}")
    if a_q.dim() != 2 or w_q.dim() != 2 or a_q.shape[1] != w_q.shape[1]:
        raise ValueError(f"a_q must be [M, K] and w_q [N, K], got {tuple(a_q.shape)} and {tuple(w_q.shape)}")
    if out_dtype not in OUT_DTYPES:
        raise ValueError(f"out_dtype must be bfloat16, float16 or float32, got {out_dtype}")
    (M, K), N = a_q.shape, w_q.shape[0]
    if bias is not None and bias.shape != (N,):
        raise ValueError(f"bias must be [{N}], got {tuple(bias.shape)}")
    sa, sw = _scale_stride(a_scale, M, "a_scale"), _scale_stride(w_scale, N, "w_scale")
    out = output_buffer(M, N, out_dtype, a_q.device, config)
    if M and N:
        args = (a_q, w_q, a_scale, w_scale, w_scale if bias is None else bias, out, M, N, K,
                triton.next_power_of_2(M), a_q.stride(0), a_q.stride(1), w_q.stride(0), w_q.stride(1), sa, sw,
                out.stride(0), out.stride(1))
        launch(_fp8_matmul_kernel, args, {"HAS_BIAS": bias is not None, "FP8_DOT": _fp8_dot(a_q.device)}, M, N,
               config)
    return out.to(out_dtype)


def fp8_linear(x: Tensor, w_q: Tensor, w_scale: Tensor, bias: Tensor | None = None,
               config: dict | None = None) -> Tensor:
    """Triton reference.fp8_linear: x [..., K] (bf16, fp16 or fp32) quantized per token to e4m3, then
    fp8_matmul; [..., N] in x.dtype."""
    if x.dtype not in OUT_DTYPES:
        raise ValueError(f"x must be float16, bfloat16 or float32, got {x.dtype}")
    K = x.shape[-1]
    a_q, a_scale = fp8_quantize_per_token(x.reshape(-1, K))
    y = fp8_matmul(a_q, a_scale, w_q, w_scale, bias, x.dtype, config)
    return y.reshape(*x.shape[:-1], y.shape[-1])
