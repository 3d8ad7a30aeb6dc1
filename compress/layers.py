"""Compressed Linear modules: one class per storage format, holding the packed tensors."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .densesparse import DenseSparseQuantized
from .grid import Quantized, QuantSpec, dequantize
from .nonuniform import LutQuantized, lut_dequantize
from .outliers import OutlierQuantized
from .pack import pack_24, pack_codes, packed_words, unpack_24, unpack_codes


class QuantLinear(nn.Module):
    """A weight-only quantized Linear (compressed-tensors `pack-quantized` storage).

    Buffers:
        weight_packed      int32 [out, ceil(in·bits/32)]  codes, compress.pack layout
        weight_scale       float16 [out, n_groups]        n_groups = ceil(in / group_size); checkpoints
                                                          of other tools may bring another dtype
        weight_zero_point  uint8 [out, n_groups]          2^(bits−1) everywhere when symmetric
        bias               [out] in the model's dtype, when the original Linear had one
    """

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

    def config_extra(self) -> dict:
        """What compression_config records for this module beyond its grid (subclasses add to it)."""
        return {}

    def extra_repr(self) -> str:
        s = self.spec
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={s.bits}, "
                f"group_size={s.group_size}, sym={s.sym}, bias={self.bias is not None}")


class Sparse24Linear(nn.Module):
    """A 2:4 sparse Linear holding only the kept weights (compress.pack.pack_24 layout).

    Buffers:
        weight_values  [out, in/2]             the two kept weights of each group of 4 inputs
        weight_meta    int32 [out, ceil(in/32)]  their 2-bit positions
        bias           [out], when the original Linear had one
    Standalone for now: compress.io.save does not write it (2:4 checkpoints stay dense compressed-tensors).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False, dtype: torch.dtype = torch.float32,
                 device=None):
        super().__init__()
        if in_features % 4:
            raise ValueError(f"2:4 needs in_features to be a multiple of 4, got {in_features}")
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight_values", torch.zeros(out_features, in_features // 2, dtype=dtype, device=device))
        self.register_buffer("weight_meta", torch.zeros(
            out_features, packed_words(in_features // 2, 2), dtype=torch.int32, device=device))
        self.weight_meta.fill_(0x44444444)  # positions 0 and 1 in every group: a valid all-zero weight
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Sparse24Linear:
        """Pack a Linear whose weight is already 2:4 sparse (ValueError if it is not)."""
        W = linear.weight.detach()
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, W.dtype, W.device)
        values, meta = pack_24(W)
        m.weight_values.copy_(values)
        m.weight_meta.copy_(meta)
        if linear.bias is not None:
            m.bias.data.copy_(linear.bias.detach())
        return m

    def dense_weight(self) -> Tensor:
        return unpack_24(self.weight_values, self.weight_meta)

    def forward(self, x: Tensor) -> Tensor:
        from compress.kernels.dispatch import sparse24_linear

        return sparse24_linear(x, self.weight_values, self.weight_meta, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def to_linear(m: QuantLinear, dtype: torch.dtype | None = None) -> nn.Linear:
    """A plain nn.Linear holding the dequantized weight."""
    dtype = dtype or (m.bias.dtype if m.bias is not None else torch.float32)
    lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, dtype=dtype,
                    device=m.weight_packed.device)
    with torch.no_grad():
        lin.weight.copy_(m.dequantized_weight())
        if m.bias is not None:
            lin.bias.copy_(m.bias)
    return lin


class LowRankLinear(nn.Module):
    """W ≈ U·V as two Linears: v (in → rank, no bias), then u (rank → out, with the original bias).

    A quantize step after the factorization turns u and v into QuantLinears; the checkpoint then
    holds {fqn}.u.* and {fqn}.v.* and config.json's compression_config records the rank.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = False,
                 dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.v = nn.Linear(in_features, rank, bias=False, dtype=dtype, device=device)
        self.u = nn.Linear(rank, out_features, bias=bias, dtype=dtype, device=device)

    @classmethod
    def from_factors(cls, U: Tensor, V: Tensor, bias: Tensor | None = None, dtype: torch.dtype | None = None
                     ) -> LowRankLinear:
        dtype = dtype or (bias.dtype if bias is not None else U.dtype)
        m = cls(V.shape[1], U.shape[0], U.shape[1], bias is not None, dtype, U.device)
        with torch.no_grad():
            m.u.weight.copy_(U)
            m.v.weight.copy_(V)
            if bias is not None:
                m.u.bias.copy_(bias.detach())
        return m

    def forward(self, x: Tensor) -> Tensor:
        return self.u(self.v(x))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


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

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, sparse={self.sparse_idx.numel()}"


class LutLinear(nn.Module):
    """LeanQuant's non-uniform layout (compress.nonuniform): codes indexing per-group tables.

    Buffers:
        weight_packed  int32 [out, ceil(in·bits/32)]    codes, compress.pack layout
        weight_lut     float16 [out, n_groups, 2^bits]  the levels; Ŵ[o, j] = lut[o, j // group_size, q[o, j]]
        bias           [out], when the original Linear had one
    Recorded in compression_config only; the kernels' reference path (lut_linear) runs it.
    """

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int = -1, bias: bool = False,
                 dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        self.in_features, self.out_features, self.bits, self.group_size = in_features, out_features, bits, group_size
        groups = 1 if group_size == -1 else -(-in_features // group_size)
        self.register_buffer("weight_packed", torch.zeros(
            out_features, packed_words(in_features, bits), dtype=torch.int32, device=device))
        self.register_buffer("weight_lut", torch.zeros(out_features, groups, 2**bits, dtype=torch.float16,
                                                       device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None

    @classmethod
    def from_lut(cls, qw: LutQuantized, bias: Tensor | None = None) -> LutLinear:
        out, cols = qw.codes.shape
        dtype = bias.dtype if bias is not None else torch.float32
        m = cls(cols, out, qw.bits, qw.group_size, bias is not None, dtype, qw.codes.device)
        m.weight_packed.copy_(pack_codes(qw.codes, qw.bits))
        m.weight_lut.copy_(qw.lut.half())
        if bias is not None:
            m.bias.data.copy_(bias.detach())
        return m

    @property
    def codes(self) -> Tensor:
        return unpack_codes(self.weight_packed, self.bits, self.in_features)

    def dequantized_weight(self) -> Tensor:
        return lut_dequantize(self.codes, self.weight_lut, self.group_size)

    def forward(self, x: Tensor) -> Tensor:
        from compress.kernels.dispatch import lut_linear

        return lut_linear(x, self.weight_packed, self.weight_lut, self.bits, self.group_size, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, bias={self.bias is not None}")


def quant_module(qw: Quantized | LutQuantized, bias: Tensor | None = None) -> nn.Module:
    """The compressed Linear a quantizer's result is stored as."""
    if isinstance(qw, LutQuantized):
        return LutLinear.from_lut(qw, bias)
    if isinstance(qw, OutlierQuantized):
        return OutlierQuantLinear.from_outliers(qw, bias)
    if isinstance(qw, DenseSparseQuantized):
        return DenseSparseLinear.from_dense_sparse(qw, bias)
    return QuantLinear.from_quantized(qw, bias)
