"""CPU fast path for quant_linear: torch's packed weight-only matmuls (ATen kernels, no Triton).

torch 2.13 ships two such CPU ops, each wanting the weight in its own layout, built once by
`prepare` (QuantLinear caches the result, so decode does not repack per call):

    int8  torch._weight_int8pack_mm(x, W8 int8 [N, K], s [N]) = x (W8 · s)ᵀ, one scale per output row
          ours: Ŵ = (q − z)·s = (q − 128)·s + (128 − z)·s, so W8 = q − 128 and the zero point becomes
          a per-row shift times Σₖ x (exact; none when symmetric, z = 128); K is padded to a multiple
          of 32 with zero columns (in torch 2.13 the op crashed on K not a multiple of 8 on an AVX2
          CPU, and on odd multiples of 8 gave wrong sums or crashed on an AVX-512 one)
    int4  torch._weight_int4pack_mm_for_cpu(x, W4, g, sz) with W4 = _convert_weight_to_int4pack_for_cpu
          (q int32 [N, K], 2) and sz [K/g, N, 2]: Ŵ = (q − 8)·sz[..., 0] + sz[..., 1], g ∈ {32, 64, 128, 256}
          dividing K; ours: scale s, zero (8 − z)·s. Our group (or the whole row) is split into the
          largest such g dividing it; a ragged last group is padded, with zero activations, to K' = ⌈K/g⌉·g,
          and rows to a multiple of 16 (the op's need; their outputs are dropped)

Both ops are vectorized for bfloat16 activations only: with float32 x they ran 10-50x slower than
float32 F.linear on this machine's AVX2 CPU. So x is rounded to bfloat16 and products are summed in
fp32 (rounded to bfloat16 on output); int4 scales and zeros are rounded to bfloat16 too (int8 keeps
its fp32 scale, applied after). Each rounding costs at most 2⁻⁹ relative, so
|y − reference| ≤ 2⁻⁷ · (|x| |Ŵ|ᵀ) elementwise (for asymmetric int8, with (q − 128)·s in place of Ŵ):
far inside the quantization error, but not bitwise the reference. Calls the ops cannot take (other
bit widths, grouped int8, groups not a multiple of 32, float16 x, g_idx) go to the reference.
"""

from __future__ import annotations

import torch
from torch import Tensor

from compress.pack import unpack_codes

INT4_GROUPS = (256, 128, 64, 32)  # what _weight_int4pack_mm_for_cpu accepts, largest first


def unsupported(x: Tensor, bits: int, group_size: int, g_idx: Tensor | None) -> str | None:
    """Why the CPU path cannot compute this call, or None when it can."""
    K = x.shape[-1]
    G = K if group_size == -1 else group_size
    if x.device.type != "cpu":
        return f"x is on {x.device}, not the CPU"
    if x.dtype not in (torch.float32, torch.bfloat16):
        return f"x is {x.dtype}; the CPU ops take float32 (via bfloat16) or bfloat16"
    if bits not in (4, 8):
        return f"{bits}-bit codes: the CPU ops take 4 or 8"
    if g_idx is not None:
        return "g_idx (act-order groups) is not supported by torch's packed CPU ops"
    if bits == 8 and G < K:
        return f"8-bit codes need one group per row (group_size -1), got group_size {group_size} for {K} inputs"
    if bits == 4 and not any(G % g == 0 for g in INT4_GROUPS):
        return f"4-bit codes need a group size that is a multiple of 32, got {G}"
    return None


def prepare(packed: Tensor, scale: Tensor, zero: Tensor, bits: int, group_size: int, in_features: int) -> dict:
    """Our packed weight -> the CPU op's layout (a dict of tensors, see the module docstring)."""
    q = unpack_codes(packed, bits, in_features)  # uint8 [N, K]
    K = in_features
    N = q.shape[0]
    if bits == 8:
        s = scale[:, 0].float()
        z = zero[:, 0].float()
        pad = -K % 32  # other K crash or sum wrongly on some CPUs (docstring): zero columns, zero activations
        w = torch.nn.functional.pad(q.to(torch.int16) - 128, (0, pad)).to(torch.int8)
        return {"bits": 8, "w": w, "pad": pad, "scale": s, "ones": torch.ones(N, dtype=torch.bfloat16),
                "shift": None if bool((z == 128).all()) else (128 - z) * s}
    G = K if group_size == -1 else group_size
    g = next(g for g in INT4_GROUPS if G % g == 0)
    pad = -K % g
    rows = -N % 16  # the op's layout holds rows in blocks of 16; extra rows' outputs are dropped
    q = torch.nn.functional.pad(q.to(torch.int32), (0, pad, 0, rows), value=8)  # padded codes meet zero activations
    parent = torch.arange(0, K + pad, g) // G  # our group of each op group
    s = torch.nn.functional.pad(scale.float()[:, parent], (0, 0, 0, rows))
    z = torch.nn.functional.pad(zero.float()[:, parent], (0, 0, 0, rows), value=8)
    sz = torch.stack((s, (8 - z) * s), -1).transpose(0, 1)  # [K'/g, N', 2]
    return {"bits": 4, "w": torch._convert_weight_to_int4pack_for_cpu(q, 2), "group": g, "pad": pad, "out": N,
            "scale_zero": sz.to(torch.bfloat16).contiguous()}


def quant_linear(x: Tensor, prepared: dict, bias: Tensor | None = None) -> Tensor:
    """y = x Ŵᵀ + b through torch's packed CPU op; x [..., K] float32 or bfloat16 -> [..., N] in x.dtype."""
    K = x.shape[-1]
    xb = x.reshape(-1, K).to(torch.bfloat16)
    if prepared["pad"]:
        xb = torch.nn.functional.pad(xb, (0, prepared["pad"]))
    if prepared["bits"] == 8:
        y = torch._weight_int8pack_mm(xb, prepared["w"], prepared["ones"]).float() * prepared["scale"]
        if prepared["shift"] is not None:
            y += x.reshape(-1, K).float().sum(-1, keepdim=True) * prepared["shift"]
    else:
        y = torch._weight_int4pack_mm_for_cpu(xb, prepared["w"], prepared["group"], prepared["scale_zero"])
        y = y[:, : prepared["out"]].float()
    if bias is not None:
        y += bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], -1)
