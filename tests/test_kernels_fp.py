"""FP8 W8A8 and FP4-weight kernels against their pure-torch references (kernels/reference.py): the FP4
layout decoded on hand-built codes, the per-token e4m3 quantizer's codes and error bound, and the
Triton kernels under TRITON_INTERPRET=1 on CPU tensors (conftest.py sets it).

Tolerances are error bounds, elementwise, with S = |x̂| |Ŵ|ᵀ + |b| (x̂ the activations the kernel
multiplies) and u the unit roundoff of the output dtype:
- rounding to the output: the reference rounds to nearest (≤ u); the kernel too (≤ u), except that
  triton 3.9's interpreter casts fp32 to bf16 by truncation (≤ 2u). The same again for Ŵ rounded to
  x.dtype, where Ŵ is not exact in x.dtype (NVFP4's e2m1·scale/global_scale mostly is not; MXFP4's
  e2m1·2^k always is).
- fp32 sums: each side adds K terms in its own order, ≤ (K − 1)·2⁻²⁴·S each (Higham), so 2K·2⁻²⁴·S
  between them, plus a few fp32 roundings of scale products (8·2⁻²⁴·S).
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from compress.kernels import reference
from compress.pack import dequantize_fp4, e2m1_values, pack_fp4, unpack_fp4

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
UNIT = {torch.float16: 2**-11, torch.bfloat16: 2**-8, torch.float32: 2**-24}
KNOWN_E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]


def triton_or_skip():
    pytest.importorskip("triton")
    if not INTERPRET:
        pytest.skip("the Triton tests run CPU tensors under TRITON_INTERPRET=1")


def kernel_round(dtype) -> float:
    """The kernel's rounding of fp32 to dtype: to nearest, or truncation of bf16 under the interpreter."""
    return 2 * UNIT[dtype] if INTERPRET and dtype == torch.bfloat16 else UNIT[dtype]


def assert_within(y, ref, x, W, bias, dtype, w_rounded: bool = False):
    """|y − ref| ≤ the bound of the module docstring; x, W the fp32 operands the product runs on."""
    S = x.double().abs().reshape(-1, x.shape[-1]) @ W.double().abs().t()
    if bias is not None:
        S = S + bias.double().abs()
    r = UNIT[dtype] + kernel_round(dtype)
    K = x.shape[-1]
    bound = r * S * (2 if w_rounded else 1) + (2 * K + 8) * 2**-24 * S + 1e-30
    err = (y.double() - ref.double()).abs().reshape(bound.shape)
    assert y.dtype == ref.dtype == dtype and y.shape == ref.shape
    assert (err <= bound).all(), f"max err/bound {(err / bound).max().item():.3g}"


# --- FP4 layout ---------------------------------------------------------------------------------------------


def test_e2m1_values_are_the_ocp_table():
    v = e2m1_values()
    assert v.dtype == torch.float32 and v.tolist() == KNOWN_E2M1
    assert torch.signbit(v[8]) and not torch.signbit(v[0])  # bit 3 is the sign, also of zero


def test_pack_fp4_puts_the_even_column_in_the_low_nibble():
    packed = pack_fp4(torch.tensor([[1, 2, 15, 8]], dtype=torch.uint8))
    assert packed.dtype == torch.uint8 and packed.tolist() == [[0x21, 0x8F]]
    codes = torch.randint(0, 16, (5, 48), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    assert torch.equal(unpack_fp4(pack_fp4(codes), 48), codes)


def every_code(rows: int, K: int) -> torch.Tensor:
    """Packed rows whose codes run 0..15 over and over: every code in every group of 16 or 32."""
    return pack_fp4((torch.arange(K) % 16).repeat(rows, 1).to(torch.uint8))


NV_SCALES = [2.0, 0.375, 448.0, 2.0**-9]  # exact in e4m3 (2^-9 its smallest subnormal)
MX_EXPONENTS = [127, 130, 120, 0]  # 1, 8, 2^-7, 2^-127 (E8M0 0: a subnormal fp32)


def fp4_known(kind: str):
    """(packed, scale, global_scale, group, Ŵ written out by hand) for 4 rows, K = 32."""
    packed = every_code(4, 32)
    if kind == "nvfp4":  # Ŵ = e2m1 · scale / 4, the same scale for both groups of a row
        scale = torch.tensor(NV_SCALES).repeat_interleave(2).reshape(4, 2).to(torch.float8_e4m3fn)
        W = [[v * s / 4.0 for v in KNOWN_E2M1 * 2] for s in NV_SCALES]
        return packed, scale, torch.tensor([4.0]), 16, torch.tensor(W)
    scale = torch.tensor(MX_EXPONENTS, dtype=torch.uint8).reshape(4, 1)
    W = [[math.ldexp(v, e - 127) for v in KNOWN_E2M1 * 2] for e in MX_EXPONENTS]
    return packed, scale, None, 32, torch.tensor(W)


@pytest.mark.parametrize("kind", ["nvfp4", "mxfp4"])
def test_dequantize_fp4_decodes_every_code_to_its_known_value(kind):
    packed, scale, global_scale, group, W = fp4_known(kind)
    got = dequantize_fp4(packed, scale, global_scale, group, 32)
    assert got.dtype == torch.float32 and torch.equal(got, W)
    assert torch.equal(torch.signbit(got), torch.signbit(W))  # code 8 is -0.0


def test_dequantize_fp4_rejects_bad_arguments():
    packed, scale, g, _, _ = fp4_known("nvfp4")
    with pytest.raises(ValueError, match="multiple of group_size"):
        dequantize_fp4(packed, scale, g, 16, 24)
    with pytest.raises(ValueError, match="weight_scale must be"):
        dequantize_fp4(packed, scale[:, :1], g, 16, 32)
    with pytest.raises(ValueError, match="global_scale"):
        dequantize_fp4(packed, scale, None, 16, 32)
    with pytest.raises(ValueError, match="no global_scale"):
        dequantize_fp4(packed, scale.view(torch.uint8), g, 16, 32)
    with pytest.raises(ValueError, match="uint8 .MXFP4. or float8_e4m3fn"):
        dequantize_fp4(packed, scale.float(), g, 16, 32)
    with pytest.raises(ValueError, match="weight_packed must be uint8"):
        dequantize_fp4(packed[:, :8], scale, g, 16, 32)


# --- the per-token e4m3 quantizer ---------------------------------------------------------------------------


def e4m3_finite() -> torch.Tensor:
    """All finite float8_e4m3fn values (every byte but the two NaNs), as fp32."""
    codes = torch.arange(256, dtype=torch.uint8)
    return codes[(codes & 0x7F) != 0x7F].view(torch.float8_e4m3fn).float()


def test_fp8_quantizer_codes_are_e4m3_nearest_and_use_the_range():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 64, generator=g) * torch.tensor([1.0, 1e3, 1e-3, 1e-30, 0.0, 3.0])[:, None]
    x[5, 7] = 1e4  # an outlier row: most of it lands on e4m3 subnormals
    x = x.to(torch.bfloat16)
    q, s = reference.fp8_quantize_per_token(x)
    assert q.dtype == torch.float8_e4m3fn and q.shape == x.shape and s.shape == (6, 1) and s.dtype == torch.float32
    assert not ((q.view(torch.uint8) & 0x7F) == 0x7F).any()  # no NaN code
    qf = q.float()
    assert (qf.abs().amax(1)[[0, 1, 2, 3, 5]] == 448).all()  # each row's largest |x| maps to ±448
    assert (qf[4] == 0).all() and s[4].item() == 2.0**-126  # an all-zero row: zero codes, a finite scale
    # the code is the e4m3 value nearest to x / s (ties either way): compare against every finite value
    v = x.float() / s
    nearest = (v.unsqueeze(-1) - e4m3_finite()).abs().amin(-1)
    assert ((v - qf).abs() <= nearest).all()
    # hence the error bound: half a step of e4m3 is ≤ 2^-4 |v| (3 mantissa bits) or 2^-10 (subnormals,
    # step 2^-9); 1 + 2^-16 covers the fp32 division and the product q · s (2^-24 each)
    err = (x.float() - qf * s).abs()
    assert (err <= (2**-4 * x.float().abs() + 2**-10 * s) * (1 + 2**-16)).all()


def test_fp8_linear_reference_error_is_the_activation_quantization_bound():
    """The W8A8 op is x Ŵᵀ up to the per-token e4m3 error of x: Σ_k |x − x̂| |Ŵ| plus fp32 rounding."""
    g = torch.Generator().manual_seed(1)
    x, W = torch.randn(5, 128, generator=g), torch.randn(24, 128, generator=g)
    w_q, w_s = reference.fp8_quantize_per_token(W)
    W_hat = w_q.float() * w_s
    _, s = reference.fp8_quantize_per_token(x)
    y = reference.fp8_linear(x, w_q, w_s)
    act_err = (2**-4 * x.abs() + 2**-10 * s) * (1 + 2**-16)
    S = x.abs() @ W_hat.abs().t()
    assert ((y - x @ W_hat.t()).abs() <= act_err @ W_hat.abs().t() + (2 * 128 + 8) * 2**-24 * S).all()


# --- FP8 W8A8, Triton under the interpreter -----------------------------------------------------------------


def fp8_weight(N: int, K: int, seed: int):
    """Per-output-channel e4m3 weight from a random one: (w_q [N, K], w_scale fp32 [N, 1], Ŵ fp32)."""
    W = torch.randn(N, K, generator=torch.Generator().manual_seed(seed))
    w_q, w_s = reference.fp8_quantize_per_token(W)
    return w_q, w_s, w_q.float() * w_s


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("M", [1, 3, 17])
def test_triton_fp8_matmul_matches_reference(M, out_dtype, bias):
    """M = 1, 3: the fp32 split-K buffer; M = 17: the epilogue rounds to out_dtype itself."""
    triton_or_skip()
    from compress.kernels.fp8_matmul import fp8_matmul

    N, K = 40, 96  # N is not a multiple of the 32-wide N block
    w_q, w_s, W = fp8_weight(N, K, seed=M)
    a_q, a_s = reference.fp8_quantize_per_token(torch.randn(M, K, generator=torch.Generator().manual_seed(M + 1)))
    b = torch.randn(N).to(torch.bfloat16) if bias else None
    y = fp8_matmul(a_q, a_s, w_q, w_s, b, out_dtype)
    ref = reference.fp8_scaled_mm(a_q, a_s, w_q, w_s, b, out_dtype)
    assert_within(y, ref, a_q.float() * a_s, W, b, out_dtype)


@pytest.mark.parametrize("fp8_dot", [True, False])
def test_triton_fp8_split_k_per_tensor_scales_and_strides_match_reference(fp8_dot):
    """Split-K atomics, a ragged last K tile, per-tensor scales, a transposed a_q, fp16 out, and both
    inner products (the fp8 dot and the fp16 up-cast)."""
    triton_or_skip()
    from compress.kernels.fp8_matmul import fp8_matmul

    N, K, M = 33, 200, 5
    w_q, w_s, _ = fp8_weight(N, K, seed=7)
    a_q, _ = reference.fp8_quantize_per_token(torch.randn(K, M, generator=torch.Generator().manual_seed(8)))
    a_q = a_q.t()  # [M, K] with strides (1, M)
    a_s, w_t = torch.tensor([0.02]), torch.tensor([0.003])
    b = torch.randn(N)
    config = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 64, "GROUP_M": 2, "SPLIT_K": 3, "FP8_DOT": fp8_dot}
    for scales, W in (((a_s, w_t), w_q.float() * w_t), ((a_s, w_s), w_q.float() * w_s)):
        for dtype in (torch.float16, torch.float32):
            y = fp8_matmul(a_q, scales[0], w_q, scales[1], b, dtype, config=config)
            ref = reference.fp8_scaled_mm(a_q, scales[0], w_q, scales[1], b, dtype)
            assert_within(y, ref, a_q.float() * a_s, W, b, dtype)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("M", [1, 3, 17])
def test_triton_fp8_linear_matches_reference(M, dtype, bias):
    """The whole op from 16-bit (or fp32) x: the same per-token codes, then the fp8 GEMM."""
    triton_or_skip()
    from compress.kernels.fp8_matmul import fp8_linear

    N, K = 40, 96
    w_q, w_s, W = fp8_weight(N, K, seed=M + 10)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(M + 11)).to(dtype)
    b = torch.randn(N).to(dtype) if bias else None
    y = fp8_linear(x, w_q, w_s, b)
    ref = reference.fp8_linear(x, w_q, w_s, b)
    q, s = reference.fp8_quantize_per_token(x)
    assert_within(y, ref, q.float() * s, W, b, dtype)
    if M == 3:  # leading dims are flattened into M
        x3 = x.reshape(1, 3, K)
        assert torch.equal(fp8_linear(x3, w_q, w_s, b), y.reshape(1, 3, N))


# --- FP4 weights, Triton under the interpreter --------------------------------------------------------------


def fp4_weight(kind: str, N: int, K: int, seed: int):
    """Random codes and scales: (packed, scale, global_scale, group_size)."""
    g = torch.Generator().manual_seed(seed)
    packed = pack_fp4(torch.randint(0, 16, (N, K), generator=g, dtype=torch.uint8))
    if kind == "nvfp4":
        scale = (torch.rand(N, K // 16, generator=g) * 400 + 1).to(torch.float8_e4m3fn)
        return packed, scale, torch.tensor([2688.0 / 1.7]), 16  # a global scale as nvfp4 writes it (448·6/amax)
    return packed, torch.randint(118, 131, (N, K // 32), generator=g, dtype=torch.uint8), None, 32


def test_triton_fp4_decodes_every_code_to_its_known_value():
    """x = I: y = Ŵᵀ, exactly (fp32 dot of one nonzero product per sum); with random codes and scales
    too, so the kernel's fp32 Ŵ is bitwise dequantize_fp4's (the division by the global scale included)."""
    triton_or_skip()
    from compress.kernels.fp4_matmul import fp4_matmul

    for kind in ("nvfp4", "mxfp4"):
        packed, scale, global_scale, group, W = fp4_known(kind)
        assert torch.equal(fp4_matmul(torch.eye(32), packed, scale, global_scale, group), W.t())
        packed, scale, global_scale, group = fp4_weight(kind, 40, 64, seed=3)
        W = dequantize_fp4(packed, scale, global_scale, group, 64)
        assert torch.equal(fp4_matmul(torch.eye(64), packed, scale, global_scale, group), W.t())


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("M", [1, 3, 17])
@pytest.mark.parametrize("kind", ["nvfp4", "mxfp4"])
def test_triton_fp4_matmul_matches_reference(kind, M, dtype, bias):
    triton_or_skip()
    from compress.kernels.fp4_matmul import fp4_matmul

    N, K = 40, 96  # K: 6 NVFP4 groups, 3 MXFP4 groups, 3 K tiles; N not a multiple of the 32-wide block
    packed, scale, global_scale, group = fp4_weight(kind, N, K, seed=M)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(M + 1)).to(dtype)
    b = torch.randn(N).to(dtype) if bias else None
    y = fp4_matmul(x, packed, scale, global_scale, group, b)
    ref = reference.fp4_linear(x, packed, scale, global_scale, group, b)
    W = dequantize_fp4(packed, scale, global_scale, group, K)
    assert_within(y, ref, x.float(), W, b, dtype, w_rounded=not torch.equal(W.to(dtype).float(), W))


@pytest.mark.parametrize("kind", ["nvfp4", "mxfp4"])
def test_triton_fp4_split_k_and_strided_x_match_reference(kind):
    """Split-K atomics, a ragged last K tile (K = 160, BLOCK_K 64), 3-D transposed x, fp16."""
    triton_or_skip()
    from compress.kernels.fp4_matmul import fp4_matmul

    N, K = 33, 160
    packed, scale, global_scale, group = fp4_weight(kind, N, K, seed=5)
    x = torch.randn(K, 2, 3, generator=torch.Generator().manual_seed(6)).half().permute(1, 2, 0)  # [2, 3, K]
    b = torch.randn(N).half()
    config = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 64, "GROUP_M": 2, "SPLIT_K": 3}
    y = fp4_matmul(x, packed, scale, global_scale, group, b, config=config)
    ref = reference.fp4_linear(x, packed, scale, global_scale, group, b)
    W = dequantize_fp4(packed, scale, global_scale, group, K)
    assert_within(y, ref, x.float(), W, b, torch.float16, w_rounded=not torch.equal(W.half().float(), W))


def test_triton_fp_wrappers_reject_bad_arguments():
    triton_or_skip()
    from compress.kernels.fp4_matmul import fp4_matmul
    from compress.kernels.fp8_matmul import fp8_linear, fp8_matmul

    w_q, w_s, _ = fp8_weight(8, 64, seed=0)
    a_q, a_s = reference.fp8_quantize_per_token(torch.randn(2, 64))
    with pytest.raises(ValueError, match="must be float8_e4m3fn"):
        fp8_matmul(a_q.float(), a_s, w_q, w_s)
    with pytest.raises(ValueError, match=r"a_q must be \[M, K\] and w_q \[N, K\]"):
        fp8_matmul(a_q[:, :32], a_s, w_q, w_s)
    with pytest.raises(ValueError, match=r"a_scale must be \[2, 1\] or one element"):
        fp8_matmul(a_q, a_s[:1].repeat(3, 1), w_q, w_s)
    with pytest.raises(ValueError, match="w_scale must be float32"):
        fp8_matmul(a_q, a_s, w_q, w_s.half())
    with pytest.raises(ValueError, match="out_dtype"):
        fp8_matmul(a_q, a_s, w_q, w_s, out_dtype=torch.float64)
    with pytest.raises(ValueError, match=r"bias must be \[8\]"):
        fp8_matmul(a_q, a_s, w_q, w_s, torch.zeros(9))
    with pytest.raises(ValueError, match="x must be"):
        fp8_linear(torch.randn(2, 64).double(), w_q, w_s)
    packed, scale, global_scale, _ = fp4_weight("nvfp4", 8, 64, seed=0)
    x = torch.randn(2, 64)
    with pytest.raises(ValueError, match="NVFP4 takes group_size 16"):
        fp4_matmul(x, packed, scale, global_scale, 32)
    with pytest.raises(ValueError, match="packed must be uint8"):
        fp4_matmul(torch.randn(2, 48), packed, scale, global_scale, 16)
    with pytest.raises(ValueError, match="scale must be"):
        fp4_matmul(x, packed, scale[:, :2], global_scale, 16)
    with pytest.raises(ValueError, match="global_scale must be"):
        fp4_matmul(x, packed, scale, None, 16)
    with pytest.raises(ValueError, match="MXFP4 takes group_size 32"):
        fp4_matmul(x, packed, scale.view(torch.uint8), None, 16)
    with pytest.raises(ValueError, match="x must be"):
        fp4_matmul(x.double(), packed, scale, global_scale, 16)
