"""The pack-quantized Linears: QuantLinear and the classes built on its tensors (W·A activation
quantization, OWQ's outlier columns, dense-and-sparse single weights)."""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import Tensor, nn

from .compressed import NO_STOCK, CompressedLinear, fill_, shape_tensor
from .densesparse import DenseSparseQuantized
from .grid import Quantized, QuantSpec
from .outliers import OutlierQuantized
from .pack import dequantize, pack_codes, packed_words, unpack_codes


def stored_group(spec: QuantSpec, cols: int) -> int:
    """The group size pack-quantized is written at: -1 per row, else one dividing cols (compressed-tensors
    needs it): a ragged 576 inputs at group 128 are written at 64, each scale repeated, and the entry
    records the true group size."""
    g = spec.group(cols)
    if g >= cols:
        return -1
    return g if cols % g == 0 else math.gcd(g, cols)


class QuantLinear(CompressedLinear):
    """A weight-only quantized Linear (compressed-tensors `pack-quantized` storage).

    Buffers:
        weight_packed      int32 [out, ceil(in·bits/32)]  codes, compress.pack layout
        weight_scale       float16 [out, n_groups]        n_groups = ceil(in / group_size); checkpoints
                                                          of other tools may bring another dtype
        weight_zero_point  uint8 [out, n_groups]          2^(bits−1) everywhere when symmetric
        bias               [out] in the model's dtype, when the original Linear had one
    Checkpoint (pack-quantized): weight_packed; weight_scale at stored_group; weight_zero_point int32
    packed along the output dim (asymmetric only); weight_shape int64 [2].
    """

    kind, pack_quantized = "quant", True
    kept: ClassVar[str | None] = None  # the entry key of a subclass's count of float16 weights (its buffers' k)

    def __init__(self, in_features: int, out_features: int, spec: QuantSpec, bias: bool = False,
                 dtype: torch.dtype = torch.float32, device=None, scale_dtype: torch.dtype = torch.float16):
        super().__init__()
        self.in_features, self.out_features, self.spec = in_features, out_features, spec
        groups = -(-in_features // spec.group(in_features))
        self.register_buffer("weight_packed", torch.zeros(
            out_features, packed_words(in_features, spec.bits), dtype=torch.int32, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, groups, dtype=scale_dtype, device=device))
        self.register_buffer("weight_zero_point", torch.zeros(out_features, groups, dtype=torch.uint8, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None
        # the CPU kernel's copy of the weight in its own layout: built on the first CPU call, rebuilt when the
        # buffers change, never in state_dict (so checkpoints are unchanged) and never moved by .to()
        self._kernel_cache: dict = {}

    @classmethod
    def from_quantized(cls, qw: Quantized, bias: Tensor | None = None) -> QuantLinear:
        out, cols = qw.codes.shape
        dtype = bias.dtype if bias is not None else torch.float32
        m = cls(cols, out, qw.spec, bias is not None, dtype, qw.codes.device)
        m.weight_packed.copy_(pack_codes(qw.codes, qw.spec.bits))
        m.weight_scale.copy_(qw.scale.half())
        m.weight_zero_point.copy_(qw.zero.to(torch.uint8))
        if bias is not None:
            m.bias.data.copy_(bias.detach())
        return m

    @property
    def codes(self) -> Tensor:
        return unpack_codes(self.weight_packed, self.spec.bits, self.in_features)

    def dequantized_weight(self) -> Tensor:
        """Ŵ [out, in] fp32, exactly what forward multiplies by."""
        return dequantize(self.codes, self.weight_scale, self.weight_zero_point, self.spec.group_size)

    def forward(self, x: Tensor) -> Tensor:
        from compress.kernels.dispatch import quant_linear

        return quant_linear(x, self.weight_packed, self.weight_scale, self.weight_zero_point,
                            self.spec.bits, self.spec.group_size, self.bias, cache=self._kernel_cache)

    def dense_weight(self) -> Tensor:
        return self.dequantized_weight()

    def act_quantized(self, act_bits: int, smooth: str = "none", smooth_tokens: int | None = None) -> ActQuantLinear:
        return ActQuantLinear.from_quant_linear(self, act_bits, smooth, smooth_tokens)

    def entry(self) -> dict:
        s = self.spec
        return {"type": self.kind, "bits": s.bits, "group_size": s.group_size, "sym": s.sym}

    def scheme(self) -> tuple[str, dict, dict | None]:
        """(compressed-tensors format, weights args, input_activations args) of its config group."""
        g = stored_group(self.spec, self.in_features)
        return "pack-quantized", {"num_bits": self.spec.bits, "type": "int", "symmetric": self.spec.sym,
                                  "dynamic": False, "strategy": "channel" if g == -1 else "group",
                                  "group_size": None if g == -1 else g}, None

    def layout(self) -> dict:
        return {**super().layout(), "scale_dtype": str(self.weight_scale.dtype).removeprefix("torch.")}

    @classmethod
    def claims(cls, entry: dict) -> bool:
        return super().claims(entry) and not entry.get("act_bits")

    @classmethod
    def empty(cls, layout: dict, dtype: torch.dtype = torch.float32, device=None) -> QuantLinear:
        spec = QuantSpec(int(layout["bits"]), int(layout["group_size"]), bool(layout["sym"]))
        extra = [int(layout[cls.kept])] if cls.kept else []
        return cls(layout["in"], layout["out"], spec, *extra, layout["bias"], dtype, device,
                   getattr(torch, layout.get("scale_dtype", "float16")))

    def tensors(self) -> dict[str, Tensor]:
        g, stored = self.spec.group(self.in_features), stored_group(self.spec, self.in_features)
        repeat, n_stored = (1, 1) if stored == -1 else (g // stored, self.in_features // stored)
        scale = self.weight_scale.repeat_interleave(repeat, dim=1)[:, :n_stored]
        t = {"weight_packed": self.weight_packed, "weight_scale": scale.contiguous(),
             "weight_shape": shape_tensor(self)}
        if not self.spec.sym:
            zero = self.weight_zero_point.repeat_interleave(repeat, dim=1)[:, : scale.shape[1]]
            t["weight_zero_point"] = pack_codes(zero.t().contiguous(), self.spec.bits).t().contiguous()
        return t

    @classmethod
    def from_tensors(cls, t: dict[str, Tensor], entry: dict, fqn: str, like: nn.Module | None = None) -> QuantLinear:
        cols = int(t["weight_shape"][1]) if "weight_shape" in t else 0
        spec = QuantSpec(int(entry["bits"]), int(entry["group_size"]), bool(entry["sym"]))
        return cls.from_packed(t, entry, stored_group(spec, cols), fqn)

    @classmethod
    def from_packed(cls, t: dict[str, Tensor], entry: dict, stored: int, fqn: str) -> QuantLinear:
        """From pack-quantized tensors written at group `stored` (-1: per row), whoever wrote them; the
        entry gives bits, sym and the true group size."""
        bits, group, sym = int(entry["bits"]), int(entry["group_size"]), bool(entry["sym"])
        t = dict(t)
        missing = {"weight_packed", "weight_scale", "weight_shape", *(() if sym else ("weight_zero_point",))} - set(t)
        if missing:
            raise ValueError(f"{fqn}: the {entry['type']} layer lacks tensors {sorted(missing)}")
        out, cols = (int(v) for v in t.pop("weight_shape").tolist())
        step = 1 if stored == -1 or group == -1 else group // stored
        cut = (lambda x: x[:, ::step].contiguous()) if group != -1 else (lambda x: x[:, :1].contiguous())
        scale, zp = cut(t.pop("weight_scale")), t.pop("weight_zero_point", None)
        if sym:
            zero = torch.full(scale.shape, 2 ** (bits - 1), dtype=torch.uint8)
        elif zp.dtype == torch.int32:  # packed along the output dim
            zero = cut(unpack_codes(zp.t().contiguous(), bits, out).t())
        else:  # unpacked signed zeros (older writers)
            zero = cut((zp.to(torch.int16) + 2 ** (bits - 1)).to(torch.uint8))
        bias = t.get("bias")
        layout = {**entry, "in": cols, "out": out, "bias": bias is not None,
                  "scale_dtype": str(scale.dtype).removeprefix("torch.")}
        m = cls.empty(layout, bias.dtype if bias is not None else torch.float32)
        t.update(weight_scale=scale, weight_zero_point=zero)
        return fill_(m, t, fqn, f"{entry['type']} {bits}-bit [{out}, {cols}]")

    def extra_repr(self) -> str:
        s = self.spec
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={s.bits}, "
                f"group_size={s.group_size}, sym={s.sym}, bias={self.bias is not None}")


class ActQuantLinear(QuantLinear):
    """A QuantLinear whose inputs are quantized too (simulated: compress.actquant.fake_quant_input).

    QuantLinear's buffers and tensors (stock runtimes load the weights: W·A16); its entry is QuantLinear's,
    type "quant", with act_bits, act_smooth and act_smooth_tokens, which compress.load restores.
    """

    kind = "actquant"
    stock_note = ("{n} Linears quantize their activations in simulation only (fake quant, recorded in "
                  "compression_config): compress.load restores it; stock runtimes load the same weights with "
                  "float activations, and `compress convert --dense` drops it")
    act_bits: int = 4
    smooth: str = "none"
    smooth_tokens: int | None = None

    @classmethod
    def claims(cls, entry: dict) -> bool:
        return entry.get("type") == "quant" and bool(entry.get("act_bits"))

    @classmethod
    def from_quant_linear(cls, m: QuantLinear, act_bits: int, smooth: str = "none",
                          smooth_tokens: int | None = None) -> ActQuantLinear:
        """The same weights (shared buffers) with quantized inputs."""
        new = cls(m.in_features, m.out_features, m.spec, m.bias is not None,
                  m.bias.dtype if m.bias is not None else torch.float32, m.weight_packed.device,
                  m.weight_scale.dtype)
        for name in ("weight_packed", "weight_scale", "weight_zero_point", "bias"):
            setattr(new, name, getattr(m, name))
        new.act_bits, new.smooth, new.smooth_tokens = act_bits, smooth, smooth_tokens
        return new

    @classmethod
    def empty(cls, layout: dict, dtype: torch.dtype = torch.float32, device=None) -> ActQuantLinear:
        m = super().empty(layout, dtype, device)
        m.act_bits, m.smooth = int(layout["act_bits"]), layout.get("act_smooth", "none")
        m.smooth_tokens = layout.get("act_smooth_tokens")
        return m

    def entry(self) -> dict:
        return {**super().entry(), "type": "quant", "act_bits": self.act_bits, "act_smooth": self.smooth,
                "act_smooth_tokens": self.smooth_tokens}

    def forward(self, x: Tensor) -> Tensor:
        from .actquant import fake_quant_input

        return super().forward(fake_quant_input(x, self.act_bits, self.smooth, self.smooth_tokens))

    def extra_repr(self) -> str:
        tokens = "" if self.smooth_tokens is None else f", smooth_tokens={self.smooth_tokens}"
        return f"{super().extra_repr()}, act_bits={self.act_bits}, smooth={self.smooth}{tokens}"


def _with_buffers(cls, qw: Quantized, bias: Tensor | None, k: int, **extra: Tensor):
    """An instance of a QuantLinear subclass sized for k extra weights: qw's codes plus the `extra` buffers."""
    out, cols = qw.codes.shape
    dtype = bias.dtype if bias is not None else torch.float32
    m = cls(cols, out, qw.spec, k, bias is not None, dtype, qw.codes.device)
    m.load_state_dict(QuantLinear.from_quantized(qw, bias).state_dict(), strict=False)
    for name, value in extra.items():
        getattr(m, name).copy_(value)
    return m


class OutlierQuantLinear(QuantLinear):
    """OWQ's layout (compress.outliers): a QuantLinear over all inputs whose weak columns' codes
    dequantize to 0, plus those columns in float16.

    Buffers, besides QuantLinear's:
        weight_outlier  float16 [out, k]   the kept columns
        outlier_idx     int32 [k]          their input indices, ascending
    forward: y = x Ŵ_qᵀ + x[..., idx] W_outlierᵀ + b. Written to disk as the pack-quantized tensors
    plus these two, and recorded in compression_config only (stock runtimes cannot load it).
    """

    kind, kept, pack_quantized = "owq", "outliers", False
    stock_note = "{n} OWQ (float16 outlier columns) Linears: " + NO_STOCK + "dequantizes them into plain Linears"

    def __init__(self, in_features: int, out_features: int, spec: QuantSpec, k: int, bias: bool = False,
                 dtype: torch.dtype = torch.float32, device=None, scale_dtype: torch.dtype = torch.float16):
        super().__init__(in_features, out_features, spec, bias, dtype, device, scale_dtype)
        self.register_buffer("weight_outlier", torch.zeros(out_features, k, dtype=torch.float16, device=device))
        self.register_buffer("outlier_idx", torch.arange(k, dtype=torch.int32, device=device))

    @classmethod
    def from_outliers(cls, qw: OutlierQuantized, bias: Tensor | None = None) -> OutlierQuantLinear:
        k = qw.outlier_idx.numel()
        return _with_buffers(cls, qw, bias, k, weight_outlier=qw.outlier, outlier_idx=qw.outlier_idx)

    def dequantized_weight(self) -> Tensor:
        W = super().dequantized_weight()
        W[:, self.outlier_idx.long()] = self.weight_outlier.float()
        return W

    def forward(self, x: Tensor) -> Tensor:
        y = super().forward(x)
        return y + nn.functional.linear(x.index_select(-1, self.outlier_idx), self.weight_outlier.to(x.dtype))

    def entry(self) -> dict:
        return {**super().entry(), "outliers": self.outlier_idx.numel()}

    def tensors(self) -> dict[str, Tensor]:
        return {**super().tensors(), "weight_outlier": self.weight_outlier, "outlier_idx": self.outlier_idx}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, outliers={self.outlier_idx.numel()}"


class DenseSparseLinear(QuantLinear):
    """Dense-and-sparse layout (compress.densesparse): a QuantLinear whose codes at k positions
    dequantize to 0, plus the weights of those positions in float16.

    Buffers, besides QuantLinear's:
        weight_sparse  float16 [k]   the detached weights
        sparse_idx     int32 [k]     their flat positions row · in + col, ascending (so out · in < 2^31)
    forward: y = x Dᵀ + x Sᵀ + b, the sparse product as a COO matrix. Written to disk as the
    pack-quantized tensors plus these two, recorded in compression_config only.
    """

    kind, kept, pack_quantized = "densesparse", "sparse", False
    stock_note = ("{n} dense-and-sparse (float16 single weights) Linears: " + NO_STOCK
                  + "dequantizes them into plain Linears")

    def __init__(self, in_features: int, out_features: int, spec: QuantSpec, k: int, bias: bool = False,
                 dtype: torch.dtype = torch.float32, device=None, scale_dtype: torch.dtype = torch.float16):
        super().__init__(in_features, out_features, spec, bias, dtype, device, scale_dtype)
        if in_features * out_features >= 2**31:
            raise ValueError(f"a [{out_features}, {in_features}] Linear has too many weights for int32 flat indices")
        self.register_buffer("weight_sparse", torch.zeros(k, dtype=torch.float16, device=device))
        self.register_buffer("sparse_idx", torch.arange(k, dtype=torch.int32, device=device))

    @classmethod
    def from_dense_sparse(cls, qw: DenseSparseQuantized, bias: Tensor | None = None) -> DenseSparseLinear:
        k = qw.sparse_idx.numel()
        return _with_buffers(cls, qw, bias, k, weight_sparse=qw.sparse, sparse_idx=qw.sparse_idx)

    def dequantized_weight(self) -> Tensor:
        W = super().dequantized_weight()
        W.view(-1)[self.sparse_idx.long()] = self.weight_sparse.float()
        return W

    def sparse_matrix(self, dtype: torch.dtype) -> Tensor:
        """S as a sparse COO tensor [out, in] (flat indices ascending: already coalesced)."""
        idx = self.sparse_idx.long()
        rows_cols = torch.stack([idx // self.in_features, idx % self.in_features])
        return torch.sparse_coo_tensor(rows_cols, self.weight_sparse.to(dtype), (self.out_features, self.in_features),
                                       is_coalesced=True, check_invariants=False)

    def forward(self, x: Tensor) -> Tensor:
        y = super().forward(x)
        x2 = x.reshape(-1, self.in_features)
        return y + torch.sparse.mm(self.sparse_matrix(x.dtype), x2.t()).t().reshape(y.shape)

    def entry(self) -> dict:
        return {**super().entry(), "sparse": self.sparse_idx.numel()}

    def tensors(self) -> dict[str, Tensor]:
        return {**super().tensors(), "weight_sparse": self.weight_sparse, "sparse_idx": self.sparse_idx}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, sparse={self.sparse_idx.numel()}"
