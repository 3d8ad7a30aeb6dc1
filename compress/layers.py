"""Compressed Linear modules: one class per storage format, each owning its serialization
(the CompressedLinear protocol, compressed.py), and FORMATS, the table of them all: save,
load, convert and inspect (saving.py, loading.py) and the stream's resume go through it, so a new
format is a class here (or in quantlinear.py, for one on pack-quantized tensors) and a row of the table.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .compressed import NO_STOCK, CompressedLinear, fill_, shape_tensor, to_linear
from .densesparse import DenseSparseQuantized
from .fplinear import FloatLinear
from .fpquant import FloatQuantized
from .grid import Quantized
from .model import weight_matrix
from .nonuniform import LutQuantized, lut_dequantize
from .outliers import OutlierQuantized
from .pack import pack_24, pack_bitmask, pack_codes, packed_words, unpack_24, unpack_bitmask, unpack_codes
from .quantlinear import ActQuantLinear, DenseSparseLinear, OutlierQuantLinear, QuantLinear, stored_group

__all__ = ["FORMATS", "ActQuantLinear", "BitmaskLinear", "CompressedLinear", "DenseSparseLinear", "FloatLinear",
           "LowRankLinear",
           "LutLinear",
           "OutlierQuantLinear", "QuantLinear", "Sparse24Linear", "format_of", "quant_module", "stored_group",
           "to_linear"]


class Sparse24Linear(CompressedLinear):
    """A 2:4 sparse Linear holding only the kept weights (compress.pack.pack_24 layout).

    Buffers (and checkpoint tensors, the values in their own dtype):
        weight_values  [out, in/2]             the two kept weights of each group of 4 inputs
        weight_meta    int32 [out, ceil(in/32)]  their 2-bit positions
        bias           [out], when the original Linear had one
    No recipe makes one yet (2:4 pruning writes dense Linears); entry {"type": "sparse24"}.
    """

    kind = "sparse24"
    stock_note = "{n} 2:4-packed Linears (kept weights, 2-bit positions): " + NO_STOCK + "unpacks them"

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

    def entry(self) -> dict:
        return {"type": self.kind}

    @classmethod
    def empty(cls, layout: dict, dtype: torch.dtype = torch.float32, device=None) -> Sparse24Linear:
        return cls(layout["in"], layout["out"], layout["bias"], dtype, device)

    def tensors(self) -> dict[str, Tensor]:
        return {"weight_values": self.weight_values, "weight_meta": self.weight_meta}

    @classmethod
    def from_tensors(cls, t: dict[str, Tensor], entry: dict, fqn: str, like: nn.Module | None = None
                     ) -> Sparse24Linear:
        if "weight_values" not in t:
            raise ValueError(f"{fqn}: the sparse24 layer lacks tensors ['weight_values']")
        (out, half), dtype = t["weight_values"].shape, t["weight_values"].dtype
        m = cls.empty({"in": 2 * half, "out": out, "bias": "bias" in t}, dtype)
        return fill_(m, t, fqn, f"sparse24 [{out}, {2 * half}]")

    def forward(self, x: Tensor) -> Tensor:
        from compress.kernels.dispatch import sparse24_linear

        return sparse24_linear(x, self.weight_values, self.weight_meta, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class BitmaskLinear(CompressedLinear):
    """A pruned Linear in compressed-tensors' `sparse-bitmask` layout (compress.pack.pack_bitmask): its
    nonzero weights and one bit per weight, 0.5625x the dense bytes at 50% sparsity and 16 bits.

    Buffers (and checkpoint tensors, under compressed-tensors' names):
        compressed   [nnz]                    the nonzero weights, row-major, in the stored dtype
        bitmask      uint8 [out, ceil(in/8)]  one bit per weight: kept or not
        row_offsets  int64 [out]              where each row starts in `compressed`
        bias         [out], when the original Linear had one
    Checkpoint: these and shape int64 [2] ([out, in]); quantization_config's sparsity_config lists the
    module. A storage format only, made at save time (saving.store_sparse_): no kernel runs it sparse, so
    forward multiplies by the dense weight, unpacked on every call. Entry {"type": "bitmask"}.
    """

    kind = "bitmask"
    sparse_bitmask = True
    stock_note = ("{n} pruned Linears in compressed-tensors sparse-bitmask: stock transformers cannot read them "
                  "(5.10+ needs compressed-tensors 0.15+, which has no sparse decompressor: it drops those tensors "
                  "and fills the weights at random, with a warning only); compress.load reads them, "
                  "`compress convert --sparse-format dense` writes them plain")

    def __init__(self, in_features: int, out_features: int, nnz: int, bias: bool = False,
                 dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("compressed", torch.zeros(nnz, dtype=dtype, device=device))
        self.register_buffer("bitmask", torch.zeros(out_features, -(-in_features // 8), dtype=torch.uint8,
                                                    device=device))
        self.register_buffer("row_offsets", torch.zeros(out_features, dtype=torch.int64, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, dtype: torch.dtype | None = None) -> BitmaskLinear:
        """The Linear's weight rounded to dtype (by default its own), packed; its bias as it is."""
        W = linear.weight.detach().to(dtype or linear.weight.dtype)
        values, bitmask, offsets = pack_bitmask(W)
        m = cls(linear.in_features, linear.out_features, values.numel(), False, W.dtype, W.device)
        m.compressed.copy_(values)
        m.bitmask.copy_(bitmask)
        m.row_offsets.copy_(offsets)
        if linear.bias is not None:
            m.bias = nn.Parameter(linear.bias.detach().clone())
        return m

    def dense_weight(self) -> Tensor:
        return unpack_bitmask(self.compressed, self.bitmask, self.in_features)

    def entry(self) -> dict:
        return {"type": self.kind}

    def layout(self) -> dict:
        return {**super().layout(), "nnz": self.compressed.numel()}

    @classmethod
    def empty(cls, layout: dict, dtype: torch.dtype = torch.float32, device=None) -> BitmaskLinear:
        return cls(layout["in"], layout["out"], int(layout["nnz"]), layout["bias"], dtype, device)

    def tensors(self) -> dict[str, Tensor]:
        return {"compressed": self.compressed, "bitmask": self.bitmask, "row_offsets": self.row_offsets,
                "shape": shape_tensor(self)}

    @classmethod
    def from_tensors(cls, t: dict[str, Tensor], entry: dict, fqn: str, like: nn.Module | None = None
                     ) -> BitmaskLinear:
        t = dict(t)
        missing = {"shape", "compressed", "bitmask", "row_offsets"} - set(t)
        if missing:
            raise ValueError(f"{fqn}: the bitmask layer lacks tensors {sorted(missing)}")
        out, cols = (int(v) for v in t.pop("shape").tolist())
        values = t["compressed"]
        m = cls(cols, out, values.numel(), "bias" in t, values.dtype)
        if "bias" in t and like is not None:  # the bias computes in the model's dtype, as a plain Linear's would
            m.bias = nn.Parameter(torch.zeros(out, dtype=like.weight.dtype))
        fill_(m, t, fqn, f"bitmask [{out}, {cols}]")
        try:
            unpack_bitmask(m.compressed, m.bitmask, cols)
        except ValueError as e:
            raise ValueError(f"{fqn}: {e}") from None
        return m

    def forward(self, x: Tensor) -> Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return nn.functional.linear(x, self.dense_weight().to(x.dtype), bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, nnz={self.compressed.numel()}, "
                f"bias={self.bias is not None}")


class LowRankLinear(CompressedLinear):
    """W ≈ U·V as two Linears: v (in → rank, no bias), then u (rank → out, with the original bias).

    No tensors of its own: the checkpoint holds {fqn}.u.* and {fqn}.v.*, plain or compressed Linears
    of their own (a quantize step after the factorization makes them QuantLinears); its entry
    records the rank, its shape is the Linear's it replaces.
    """

    kind = "lowrank"
    stock_note = ("{n} low-rank Linears (u, v factors): " + NO_STOCK
                  + "multiplies them out into plain Linears (a stock checkpoint, without the size saving)")

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

    @property
    def bias(self) -> Tensor | None:
        return self.u.bias

    def dense_weight(self) -> Tensor:
        w = lambda f: f.weight.float() if isinstance(f, nn.Linear) else f.dense_weight().float()  # noqa: E731
        return w(self.u) @ w(self.v)

    def entry(self) -> dict:
        return {"type": self.kind, "rank": self.rank}

    @classmethod
    def empty(cls, layout: dict, dtype: torch.dtype = torch.float32, device=None) -> LowRankLinear:
        return cls(layout["in"], layout["out"], int(layout["rank"]), layout["bias"], dtype, device)

    def tensors(self) -> dict[str, Tensor]:
        return {}

    @classmethod
    def from_tensors(cls, t: dict[str, Tensor], entry: dict, fqn: str, like: nn.Module | None = None
                     ) -> LowRankLinear:
        out, cols = weight_matrix(like).shape
        m = cls.empty({**entry, "in": cols, "out": out, "bias": like.bias is not None}, like.weight.dtype)
        return fill_(m, t, fqn, "lowrank")

    def forward(self, x: Tensor) -> Tensor:
        return self.u(self.v(x))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


class LutLinear(CompressedLinear):
    """LeanQuant's non-uniform layout (compress.nonuniform): codes indexing per-group tables.

    Buffers:
        weight_packed  int32 [out, ceil(in·bits/32)]    codes, compress.pack layout
        weight_lut     float16 [out, n_groups, 2^bits]  the levels; Ŵ[o, j] = lut[o, j // group_size, q[o, j]]
        bias           [out], when the original Linear had one
    Checkpoint: these two and weight_shape int64 [2]. Recorded in compression_config only; the kernels'
    reference path (lut_linear) runs it.
    """

    kind = "lut"
    stock_note = ("{n} LeanQuant (non-uniform codes with lookup tables) Linears: " + NO_STOCK
                  + "dequantizes them into plain Linears")

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

    def dense_weight(self) -> Tensor:
        return self.dequantized_weight()

    def entry(self) -> dict:
        return {"type": self.kind, "bits": self.bits, "group_size": self.group_size}

    @classmethod
    def empty(cls, layout: dict, dtype: torch.dtype = torch.float32, device=None) -> LutLinear:
        return cls(layout["in"], layout["out"], int(layout["bits"]), int(layout["group_size"]), layout["bias"],
                   dtype, device)

    def tensors(self) -> dict[str, Tensor]:
        return {"weight_packed": self.weight_packed, "weight_lut": self.weight_lut, "weight_shape": shape_tensor(self)}

    @classmethod
    def from_tensors(cls, t: dict[str, Tensor], entry: dict, fqn: str, like: nn.Module | None = None) -> LutLinear:
        t = dict(t)
        if "weight_shape" not in t:
            raise ValueError(f"{fqn}: the lut layer lacks tensors ['weight_shape']")
        out, cols = (int(v) for v in t.pop("weight_shape").tolist())
        bias = t.get("bias")
        m = cls.empty({**entry, "in": cols, "out": out, "bias": bias is not None},
                      bias.dtype if bias is not None else torch.float32)
        return fill_(m, t, fqn, f"lut {entry['bits']}-bit [{out}, {cols}]")

    def forward(self, x: Tensor) -> Tensor:
        from compress.kernels.dispatch import lut_linear

        return lut_linear(x, self.weight_packed, self.weight_lut, self.bits, self.group_size, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, bias={self.bias is not None}")


FORMATS: dict[str, type[CompressedLinear]] = {c.kind: c for c in (
    QuantLinear, ActQuantLinear, OutlierQuantLinear, DenseSparseLinear, LutLinear, Sparse24Linear, BitmaskLinear,
    LowRankLinear, FloatLinear)}


def format_of(entry: dict | None) -> type[CompressedLinear] | None:
    """The class of a compression_config entry or stream layout record (None: a plain Linear's)."""
    return next((c for c in FORMATS.values() if entry and c.claims(entry)), None)


def quant_module(qw: Quantized | LutQuantized | FloatQuantized, bias: Tensor | None = None) -> nn.Module:
    """The compressed Linear a quantizer's result is stored as."""
    if isinstance(qw, FloatQuantized):
        return FloatLinear.from_quantized(qw, bias, qw.act, qw.act_scale)
    if isinstance(qw, LutQuantized):
        return LutLinear.from_lut(qw, bias)
    if isinstance(qw, OutlierQuantized):
        return OutlierQuantLinear.from_outliers(qw, bias)
    if isinstance(qw, DenseSparseQuantized):
        return DenseSparseLinear.from_dense_sparse(qw, bias)
    return QuantLinear.from_quantized(qw, bias)
