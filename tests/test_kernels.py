"""Kernels against their pure-torch references: Triton under TRITON_INTERPRET=1 on CPU tensors (conftest.py
sets it), the CPU path (torch's packed int ops), dispatch, the 2:4 layout, and the layers that use them.

Tolerances are error bounds, elementwise: with S = |x| |Ŵ|ᵀ + |b| and u the unit roundoff of x's
dtype, two results that each sum exact products in fp32 and round once differ by at most
4u·S + K·2⁻²⁴·S (the fp32 summation order differs between kernels).
"""

from __future__ import annotations

import os

import pytest
import torch

from compress.grid import QuantSpec, dequantize, rtn
from compress.kernels import cpu, reference
from compress.kernels.dispatch import CPU_MAX_ROWS, kernel_path, quant_linear, sparse24_linear
from compress.layers import QuantLinear, Sparse24Linear
from compress.pack import pack_24, pack_codes, unpack_24


def triton_or_skip():
    """The kernel tests need triton, and TRITON_INTERPRET=1 from the start (conftest.py sets it)."""
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the Triton tests run CPU tensors under TRITON_INTERPRET=1")


UNIT = {torch.float16: 2**-11, torch.bfloat16: 2**-8, torch.float32: 2**-24}
DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def quantized(N: int, K: int, bits: int, group_size: int, seed: int = 0, sym: bool = False):
    g = torch.Generator().manual_seed(seed)
    groups = 1 if group_size == -1 else -(-K // group_size)
    codes = torch.randint(0, 2**bits, (N, K), generator=g, dtype=torch.uint8)
    scale = (torch.rand(N, groups, generator=g) * 0.05 + 0.005).half()
    zero = (torch.full((N, groups), 2 ** (bits - 1)) if sym else torch.randint(0, 2**bits, (N, groups), generator=g))
    return codes, pack_codes(codes, bits), scale, zero.to(torch.uint8)


def sparse_weight(N: int, K: int, seed: int = 0, dtype=torch.float16) -> torch.Tensor:
    """A random 2:4 matrix; some groups keep fewer than two nonzeros."""
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(N, K // 4, 4, generator=g).argsort(-1)[..., :2]
    mask = torch.zeros(N, K // 4, 4, dtype=torch.bool).scatter_(-1, keep, True).reshape(N, K)
    W = torch.randn(N, K, generator=g) * mask
    W[torch.rand(N, K, generator=g) < 0.1] = 0
    return W.to(dtype)


def assert_within(y, ref, x, W, bias, dtype, factor: float = 4.0):
    S = x.double().abs().reshape(-1, x.shape[-1]) @ W.to(dtype).double().abs().t()
    if bias is not None:
        S = S + bias.double().abs()
    bound = factor * UNIT[dtype] * S + x.shape[-1] * 2**-24 * S + 1e-30
    err = (y.double() - ref.double()).abs().reshape(bound.shape)
    assert y.dtype == ref.dtype and y.shape == ref.shape
    assert (err <= bound).all(), f"max err/bound {(err / bound).max().item():.3g}"


# --- the 2:4 layout ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1, 4), (3, 8), (5, 100), (7, 576)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_pack_24_round_trip_is_exact(shape, dtype):
    W = sparse_weight(*shape, seed=shape[1], dtype=dtype)
    values, meta = pack_24(W)
    assert values.shape == (shape[0], shape[1] // 2) and values.dtype == dtype
    assert meta.dtype == torch.int32 and meta.shape == (shape[0], -(-shape[1] // 32))
    assert torch.equal(unpack_24(values, meta), W)


def test_pack_24_layout_is_the_docstring_example():
    W = torch.tensor([[0, 1.0, 0, 2.0, 3.0, 0, 0, 4.0]])
    values, meta = pack_24(W)
    assert values.tolist() == [[1.0, 2.0, 3.0, 4.0]]
    assert meta.item() == 1 | 3 << 2 | 0 << 4 | 3 << 6  # positions 1, 3, 0, 3, LSB first


def test_pack_24_keeps_zeros_at_the_lowest_free_positions():
    values, meta = pack_24(torch.tensor([[0, 0, 5.0, 0], [0, 0, 0, 0]]))
    assert values.tolist() == [[0.0, 5.0], [0.0, 0.0]]
    assert meta[:, 0].tolist() == [0 | 2 << 2, 0 | 1 << 2]


def test_pack_24_rejects_what_is_not_2_4():
    with pytest.raises(ValueError, match="multiple of 4"):
        pack_24(torch.zeros(2, 6))
    with pytest.raises(ValueError, match="more than two nonzeros"):
        pack_24(torch.tensor([[1.0, 1.0, 1.0, 0.0]]))
    with pytest.raises(ValueError, match="increasing"):
        unpack_24(torch.zeros(1, 2), torch.zeros(1, 1, dtype=torch.int32))  # positions 0, 0
    with pytest.raises(ValueError, match="meta must be int32"):
        unpack_24(torch.zeros(1, 2), torch.zeros(1, 2, dtype=torch.int32))


# --- references ---------------------------------------------------------------------------------------------


def test_reference_g_idx_of_contiguous_groups_equals_group_size():
    codes, packed, scale, zero = quantized(12, 70, 4, 32)
    x = torch.randn(3, 70)
    g_idx = torch.arange(70) // 32
    assert torch.equal(reference.quant_linear(x, packed, scale, zero, 4, 32, g_idx=g_idx),
                       reference.quant_linear(x, packed, scale, zero, 4, 32))


def test_reference_g_idx_picks_each_inputs_group():
    codes, packed, scale, zero = quantized(12, 64, 4, 32)
    g_idx = torch.randperm(64, generator=torch.Generator().manual_seed(0)) % 2  # act-order: groups interleaved
    W = (codes.float() - zero.float()[:, g_idx]) * scale.float()[:, g_idx]
    x = torch.randn(3, 64)
    assert torch.equal(reference.quant_linear(x, packed, scale, zero, 4, 32, g_idx=g_idx), x @ W.t())


# --- Triton, under the interpreter --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("M", [1, 7, 33])
@pytest.mark.parametrize("bits", [4, 8])
def test_triton_quant_matmul_matches_reference(bits, M, group_size, dtype):
    triton_or_skip()
    from compress.kernels.quant_matmul import quant_matmul

    N, K = 40, 200  # K is not a multiple of the 32-wide K block, nor of the groups: the last group is ragged
    codes, packed, scale, zero = quantized(N, K, bits, group_size, seed=M)
    x = torch.randn(M, K).to(dtype)
    bias = torch.randn(N).to(dtype)
    y = quant_matmul(x, packed, scale, zero, bits, group_size, bias)
    ref = reference.quant_linear(x, packed, scale, zero, bits, group_size, bias)
    assert_within(y, ref, x, dequantize(codes, scale, zero, group_size), bias, dtype)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_triton_quant_split_k_and_odd_layouts_match_reference(bits, dtype):
    """Split-K (atomics), one group per row, g_idx, 3-D and non-contiguous x."""
    triton_or_skip()
    from compress.kernels.quant_matmul import quant_matmul

    N, K = 33, 100
    split = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 2, "SPLIT_K": 3}
    codes, packed, scale, zero = quantized(N, K, bits, -1)
    x = torch.randn(K, 2, 5).to(dtype).permute(1, 2, 0)  # [2, 5, K], strided
    for config in (None, split):
        y = quant_matmul(x, packed, scale, zero, bits, -1, config=config)
        ref = reference.quant_linear(x, packed, scale, zero, bits, -1)
        assert_within(y, ref, x, dequantize(codes, scale, zero, -1), None, dtype)
    codes, packed, scale, zero = quantized(N, K, bits, 25, seed=1)
    g_idx = torch.randperm(K, generator=torch.Generator().manual_seed(1)) % 4
    W = (codes.float() - zero.float()[:, g_idx]) * scale.float()[:, g_idx]
    y = quant_matmul(x, packed, scale, zero, bits, 25, g_idx=g_idx, config=split)
    assert_within(y, reference.quant_linear(x, packed, scale, zero, bits, 25, g_idx=g_idx), x, W, None, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M", [1, 7, 33])
def test_triton_sparse24_matmul_matches_reference(M, dtype):
    triton_or_skip()
    from compress.kernels.sparse24_matmul import sparse24_matmul

    N, K = 40, 200
    W = sparse_weight(N, K, seed=M)
    values, meta = pack_24(W)
    x = torch.randn(M, K).to(dtype)
    bias = torch.randn(N).to(dtype)
    for config in (None, {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 2, "SPLIT_K": 3}):
        y = sparse24_matmul(x, values, meta, bias, config=config)
        assert_within(y, reference.sparse24_linear(x, values, meta, bias), x, W, bias, dtype)


def test_triton_wrappers_reject_bad_arguments():
    triton_or_skip()
    from compress.kernels.quant_matmul import quant_matmul
    from compress.kernels.sparse24_matmul import sparse24_matmul

    codes, packed, scale, zero = quantized(8, 64, 4, 32)
    x = torch.randn(2, 64)
    with pytest.raises(ValueError, match="4- or 8-bit"):
        quant_matmul(x, pack_codes(codes & 7, 3), scale, zero, 3, 32)
    with pytest.raises(ValueError, match="packed must be int32"):
        quant_matmul(torch.randn(2, 56), packed, scale, zero, 4, 32)
    with pytest.raises(ValueError, match="scale and zero"):
        quant_matmul(x, packed, scale, zero, 4, 16)
    with pytest.raises(ValueError, match="float16, bfloat16 or float32"):
        quant_matmul(x.double(), packed, scale, zero, 4, 32)
    values, meta = pack_24(sparse_weight(8, 64))
    with pytest.raises(ValueError, match="values must be"):
        sparse24_matmul(torch.randn(2, 66), values, meta)
    with pytest.raises(ValueError, match="meta must be"):
        sparse24_matmul(x, values, meta[:, :1])


# --- the CPU path -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M", [1, 7, 33])
@pytest.mark.parametrize("bits,group_size,K,sym", [
    (8, -1, 576, True), (8, -1, 100, False),  # K = 100: not a multiple of the op's 8
    (4, 128, 576, True), (4, 64, 200, False), (4, 32, 100, True), (4, -1, 576, False),  # ragged last groups
])
def test_cpu_path_matches_reference(bits, group_size, K, sym, M, dtype):
    N = 70  # not a multiple of the int4 op's 16 rows
    codes, packed, scale, zero = quantized(N, K, bits, group_size, seed=K + M, sym=sym)
    x = torch.randn(M, K).to(dtype)
    bias = torch.randn(N).to(dtype)
    assert cpu.unsupported(x, bits, group_size, None) is None
    y = cpu.quant_linear(x, cpu.prepare(packed, scale, zero, bits, group_size, K), bias)
    ref = reference.quant_linear(x, packed, scale, zero, bits, group_size, bias)
    # x, the output and int4's scales and zeros go through bfloat16 (cpu.py); asymmetric int8 multiplies
    # (q − 128)·s and adds the zero point's share after, so its bound is on |q − 128|·s
    W = (codes.float() - 128) * scale.float() if bits == 8 else dequantize(codes, scale, zero, group_size)
    if bits == 8:
        W = torch.maximum(W.abs(), dequantize(codes, scale, zero, group_size).abs())
    assert_within(y, ref, x, W, bias, torch.bfloat16)


def test_cpu_path_says_what_it_cannot_run():
    x = torch.randn(2, 64)
    assert "4 or 8" in cpu.unsupported(x, 3, 32, None)
    assert "group_size -1" in cpu.unsupported(x, 8, 32, None)
    assert "multiple of 32" in cpu.unsupported(x, 4, 48, None)
    assert "float16" in cpu.unsupported(x.half(), 4, 32, None)
    assert "g_idx" in cpu.unsupported(x, 4, 32, torch.zeros(64, dtype=torch.int32))


# --- dispatch -----------------------------------------------------------------------------------------------


def test_dispatch_auto_picks_cpu_for_bf16_decode_and_reference_otherwise(monkeypatch):
    monkeypatch.delenv("COMPRESS_KERNELS", raising=False)
    bf16 = torch.bfloat16
    assert kernel_path("quant", torch.randn(1, 64, dtype=bf16), 4, 32) == "cpu"
    assert CPU_MAX_ROWS == 32 and kernel_path("quant", torch.randn(4, 8, 64, dtype=bf16), 8, -1) == "cpu"
    assert kernel_path("quant", torch.randn(3, 11, 64, dtype=bf16), 8, -1) == "reference"  # prefill, perplexity
    assert kernel_path("quant", torch.randn(1, 64), 4, 32) == "reference"  # float32: only when forced
    assert kernel_path("quant", torch.randn(1, 64, dtype=bf16), 3, 32) == "reference"
    assert kernel_path("quant", torch.randn(1, 64).half(), 4, 32) == "reference"
    assert kernel_path("sparse24", torch.randn(1, 64, dtype=bf16)) == "reference"


def test_dispatch_forced_paths_run_or_say_why(monkeypatch):
    codes, packed, scale, zero = quantized(16, 64, 4, 32)
    x = torch.randn(3, 64)
    ref = reference.quant_linear(x, packed, scale, zero, 4, 32)
    monkeypatch.setenv("COMPRESS_KERNELS", "reference")
    assert torch.equal(quant_linear(x, packed, scale, zero, 4, 32), ref)
    monkeypatch.setenv("COMPRESS_KERNELS", "cpu")
    assert kernel_path("quant", torch.randn(500, 64), 4, 32) == "cpu"  # forced: no row limit
    with pytest.raises(ValueError, match="COMPRESS_KERNELS=cpu cannot run.*4 or 8"):
        quant_linear(x, pack_codes(codes & 7, 3), scale, zero, 3, 32)
    with pytest.raises(ValueError, match="2:4 has no CPU fast path"):
        sparse24_linear(x, *pack_24(sparse_weight(4, 64)))
    monkeypatch.setenv("COMPRESS_KERNELS", "triton")
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ValueError, match="COMPRESS_KERNELS=triton cannot run.*CUDA"):
        quant_linear(x, packed, scale, zero, 4, 32)
    monkeypatch.setenv("COMPRESS_KERNELS", "fast")
    with pytest.raises(ValueError, match="expected one of reference, triton, cpu"):
        quant_linear(x, packed, scale, zero, 4, 32)


def test_dispatch_forced_triton_runs_under_the_interpreter(monkeypatch):
    triton_or_skip()
    monkeypatch.setenv("COMPRESS_KERNELS", "triton")
    codes, packed, scale, zero = quantized(16, 64, 8, -1)
    x = torch.randn(3, 64, dtype=torch.float16)
    y = quant_linear(x, packed, scale, zero, 8, -1)
    assert_within(y, reference.quant_linear(x, packed, scale, zero, 8, -1), x, dequantize(codes, scale, zero, -1),
                  None, torch.float16)
    W = sparse_weight(16, 64)
    y = sparse24_linear(x, *pack_24(W))
    assert_within(y, reference.sparse24_linear(x, *pack_24(W)), x, W, None, torch.float16)


# --- layers -------------------------------------------------------------------------------------------------


def test_quant_linear_caches_the_cpu_weight_and_keeps_state_dict(monkeypatch):
    monkeypatch.setenv("COMPRESS_KERNELS", "cpu")
    W, b = torch.randn(48, 96), torch.randn(48)
    m = QuantLinear.from_quantized(rtn(W, QuantSpec(4, 32, True)), b)
    keys = list(m.state_dict())
    x = torch.randn(1, 96)
    y = m(x)
    cached = m._kernel_cache["weight"]
    m(torch.randn(2, 96))
    assert m._kernel_cache["weight"] is cached  # converted once, not per call
    assert list(m.state_dict()) == keys
    assert_within(y, torch.nn.functional.linear(x, m.dequantized_weight(), b), x, m.dequantized_weight(), b,
                  torch.bfloat16)
    other = QuantLinear.from_quantized(rtn(torch.randn(48, 96), QuantSpec(4, 32, True)), torch.randn(48))
    m.load_state_dict(other.state_dict())  # written in place: the cache must notice
    assert_within(m(x), other(x), x, other.dequantized_weight(), other.bias, torch.bfloat16)
    assert m._kernel_cache["weight"] is not cached


def test_sparse24_linear_is_the_pruned_linear():
    lin = torch.nn.Linear(64, 24)
    with torch.no_grad():
        lin.weight.copy_(sparse_weight(24, 64, dtype=torch.float32))
    m = Sparse24Linear.from_linear(lin)
    x = torch.randn(2, 5, 64)
    assert torch.equal(m.dense_weight(), lin.weight)
    assert torch.equal(m(x), lin(x))
    assert set(m.state_dict()) == {"weight_values", "weight_meta", "bias"}
    assert torch.equal(Sparse24Linear(64, 3)(x), torch.zeros(2, 5, 3))
    with pytest.raises(ValueError, match="more than two nonzeros"):
        Sparse24Linear.from_linear(torch.nn.Linear(64, 4))


def test_w8_greedy_decode_is_the_same_on_the_cpu_path_and_the_reference(monkeypatch):
    """On the tiny Llama; evals on SmolLM2 run in `python -m compress.kernels.bench cpu`."""
    from conftest import tiny_model

    from compress import Recipe, Rtn
    from compress.apply import compress_

    model = tiny_model("llama")
    compress_(model, Recipe(steps=(Rtn(bits=8, group_size=-1, lm_head=True),)), progress=False)
    assert isinstance(model.lm_head, QuantLinear)
    ids = torch.tensor([[5, 17, 42, 7]])
    out = {}
    for path in ("cpu", "reference"):
        monkeypatch.setenv("COMPRESS_KERNELS", path)
        with torch.inference_mode():
            out[path] = model.generate(ids, max_new_tokens=24, min_new_tokens=24, do_sample=False, pad_token_id=1)
    assert torch.equal(out["cpu"], out["reference"])
