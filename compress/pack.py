"""Bit packing of integer codes into int32 words (compressed-tensors' `pack-quantized` layout), of
2:4 and unstructured sparse weights (pack_24; pack_bitmask, compressed-tensors' `sparse-bitmask`),
and the dequantization of stored codes: integer grids (dequantize) and lookup tables (lut_dequantize).

Codes of `bits` bits (1 to 8) are packed densely along the input dimension, 32 codes into
exactly `bits` words, least significant bits first; a code may straddle two words. For 4 bits
this is eight codes per word:

    codes  row r:  c0 c1 c2 c3 c4 c5 c6 c7 | c8 ...
    word   [r, 0]: bits 31..28 = c7, ..., bits 7..4 = c1, bits 3..0 = c0
    word   [r, 1]: c15 ... c8

For 3 bits, c10 takes bits 30..32 of the stream: bits 30-31 of word 0 and bit 0 of word 1. A row
of `cols` codes takes ceil(cols · bits / 32) words; the tail is zero-padded. compressed-tensors
stores signed values offset by 2^(bits-1); our codes are the unsigned values it packs, so the
words are the same.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def packed_words(cols: int, bits: int) -> int:
    return math.ceil(cols * bits / 32)


def pack_codes(codes: Tensor, bits: int) -> Tensor:
    """uint8 codes [rows, cols] in [0, 2^bits) -> int32 words [rows, ceil(cols·bits/32)]."""
    _check_bits(bits)
    rows, cols = codes.shape
    if codes.numel() and int(codes.max()) >> bits:
        raise ValueError(f"codes do not fit in {bits} bits")
    c = codes.to(torch.uint8)
    if bits in (4, 8):  # whole bytes or nibbles of little-endian words: no bit stream needed
        c = torch.nn.functional.pad(c, (0, -cols % (32 // bits)))
        b = c if bits == 8 else c[:, 0::2] | (c[:, 1::2] << 4)
        # through 1-D: a [1, n] view of a column ([n, 1] transposed) counts as contiguous with stride 1
        return b.contiguous().view(-1).view(torch.int32).reshape(rows, b.shape[1] // 4)
    # the bit stream takes 16·bits bytes a code: pack a bounded number of rows at a time
    step = max(1, 2**20 // max(cols, 1))
    return torch.cat([_pack_bit_stream(c[i:i + step], bits) for i in range(0, rows, step)]) if rows else \
        torch.zeros(0, packed_words(cols, bits), dtype=torch.int32, device=codes.device)


def _pack_bit_stream(c: Tensor, bits: int) -> Tensor:
    """Any width: bit k of code i goes to bit i·bits + k of the row's stream of words."""
    rows, cols = c.shape
    c = torch.nn.functional.pad(c, (0, -cols % 32)).reshape(rows, -1, 32)
    shifts = torch.arange(bits, dtype=torch.uint8, device=c.device)
    stream = ((c.unsqueeze(-1) >> shifts) & 1).reshape(rows, -1, bits, 32)  # bit k of code i at i·bits + k
    weights = torch.ones(32, dtype=torch.int64, device=c.device) << torch.arange(32, device=c.device)
    words = (stream.to(torch.int64) * weights).sum(-1)  # [rows, chunks, bits], each in [0, 2^32)
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    return words.reshape(rows, -1)[:, : packed_words(cols, bits)].contiguous()


def unpack_codes(packed: Tensor, bits: int, cols: int) -> Tensor:
    """int32 words [rows, ceil(cols·bits/32)] -> uint8 codes [rows, cols]; inverse of pack_codes."""
    _check_bits(bits)
    rows, n = packed.shape
    if n != packed_words(cols, bits):
        raise ValueError(f"{n} words per row cannot hold {cols} codes of {bits} bits")
    if bits in (4, 8):  # whole bytes or nibbles: no bit stream needed (little-endian words)
        b = packed.contiguous().view(torch.uint8).reshape(rows, 4 * n)  # sizes spelled out: rows may be 0
        return (b if bits == 8 else torch.stack((b & 0xF, b >> 4), -1).reshape(rows, 8 * n))[:, :cols]
    chunks = math.ceil(cols / 32)
    w = torch.nn.functional.pad(packed, (0, chunks * bits - n)).reshape(rows, chunks, bits, 1)
    stream = (w >> torch.arange(32, dtype=torch.int32, device=packed.device)) & 1  # [rows, chunks, bits, 32]
    stream = stream.reshape(rows, chunks, 32, bits).to(torch.uint8)
    codes = (stream << torch.arange(bits, dtype=torch.uint8, device=packed.device)).sum(-1, dtype=torch.uint8)
    return codes.reshape(rows, 32 * chunks)[:, :cols]


def _check_bits(bits: int) -> None:
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in [1, 8], got {bits}")


def pack_24(W: Tensor) -> tuple[Tensor, Tensor]:
    """A 2:4 sparse matrix [rows, cols] -> (values [rows, cols/2], meta int32 [rows, ceil(cols/32)]).

    Every group of 4 consecutive inputs keeps two slots: its nonzeros, then (when it has fewer than
    two) its lowest zero positions, in increasing position order. A slot stores the value and the
    2-bit position of that value inside its group; positions are packed with `pack_codes(·, 2)`,
    16 per int32 word, least significant bits first:

        W row r:     .  a  .  b | c  .  .  d | . . . . | ...     cols, groups of 4
        values[r]:   a  b  c  d  0  0  ...                       cols/2, two per group, W's dtype
        positions:   1  3  0  3  0  1  ...                       2 bits each, i0 < i1 within a group
        meta[r, 0]:  bits 1..0 = 1, bits 3..2 = 3, bits 5..4 = 0, bits 7..6 = 3, bits 9..8 = 0, ...

    9 bits per original weight at fp16 (16 + 2 per kept value, half the values kept).
    unpack_24 inverts it exactly (a -0.0 comes back as +0.0: zeros are not kept by sign).
    Raises ValueError when cols is not a multiple of 4 or a group holds more than two nonzeros.
    """
    rows, cols = W.shape
    if cols % 4:
        raise ValueError(f"2:4 needs the input dim to be a multiple of 4, got {cols}")
    groups = W.reshape(rows, cols // 4, 4)
    nonzero = groups != 0
    if bool((nonzero.sum(-1) > 2).any()):
        raise ValueError("not 2:4 sparse: a group of 4 inputs holds more than two nonzeros")
    pos = torch.arange(4, device=W.device)
    rank = nonzero.to(torch.int64) * 8 - pos  # nonzeros first, then the lowest positions
    idx = rank.topk(2, dim=-1).indices.sort(-1).values  # [rows, cols/4, 2]
    values = groups.gather(-1, idx).reshape(rows, cols // 2)
    meta = pack_codes(idx.reshape(rows, cols // 2).to(torch.uint8), 2)
    return values.contiguous(), meta


def unpack_24(values: Tensor, meta: Tensor) -> Tensor:
    """(values [rows, cols/2], meta int32 [rows, ceil(cols/32)]) -> dense W [rows, cols]; inverse of pack_24."""
    rows, half = values.shape
    if meta.dtype != torch.int32 or meta.shape != (rows, packed_words(half, 2)):
        raise ValueError(f"meta must be int32 [{rows}, {packed_words(half, 2)}] for values {tuple(values.shape)}, "
                         f"got {meta.dtype} {tuple(meta.shape)}")
    if half % 2:
        raise ValueError(f"values hold two slots per group of 4, so an even count per row; got {half}")
    idx = unpack_codes(meta, 2, half).to(torch.int64).reshape(rows, half // 2, 2)
    if bool((idx[..., 0] >= idx[..., 1]).any()):
        raise ValueError("malformed 2:4 meta: the two positions of a group must be increasing")
    W = torch.zeros(rows, half // 2, 4, dtype=values.dtype, device=values.device)
    return W.scatter_(-1, idx, values.reshape(rows, half // 2, 2)).reshape(rows, half * 2)


def pack_bitmask(W: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """A sparse matrix [rows, cols] -> compressed-tensors `sparse-bitmask` (its BitmaskCompressor's
    layout): (values [nnz], bitmask uint8 [rows, ceil(cols/8)], row_offsets int64 [rows]).

    values are the nonzeros in row-major order, in W's dtype; bit j of bitmask[r, b] says whether
    W[r, 8b + j] is kept (numpy.packbits(..., bitorder="little"), zero-padded at the row's end);
    row_offsets[r] is where row r starts in values. A -0.0 is a zero and comes back +0.0.

        W row r:      a  .  .  b  .  c  .  .  | d  ...
        bitmask[r,0]: 0b00101001 (bits 0, 3, 5)        values: ... a b c d ...
    """
    rows, cols = W.shape
    mask = W != 0
    counts = mask.sum(-1)
    padded = torch.nn.functional.pad(mask.to(torch.uint8), (0, -cols % 8)).reshape(rows, -1, 8)
    bit = 1 << torch.arange(8, dtype=torch.uint8, device=W.device)
    return W[mask], (padded * bit).sum(-1, dtype=torch.uint8), counts.cumsum(0) - counts


def unpack_bitmask(values: Tensor, bitmask: Tensor, cols: int) -> Tensor:
    """(values [nnz], bitmask uint8 [rows, ceil(cols/8)]) -> dense W [rows, cols]; inverse of pack_bitmask."""
    rows = bitmask.shape[0]
    if bitmask.dtype != torch.uint8 or bitmask.shape != (rows, -(-cols // 8)):
        raise ValueError(f"bitmask must be uint8 [{rows}, {-(-cols // 8)}] for {cols} inputs, "
                         f"got {bitmask.dtype} {tuple(bitmask.shape)}")
    bit = torch.arange(8, dtype=torch.uint8, device=bitmask.device)
    mask = ((bitmask.unsqueeze(-1) >> bit) & 1).reshape(rows, -1)[:, :cols].bool()
    kept = int(mask.sum())
    if kept != values.numel():
        raise ValueError(f"the bitmask keeps {kept} weights and {values.numel()} values are stored")
    return torch.zeros(rows, cols, dtype=values.dtype, device=values.device).masked_scatter_(mask, values)


# dequantizing the stored codes: what the kernels' references compute, so they depend on this module alone


def expand_groups(t: Tensor, group: int, cols: int) -> Tensor:
    """[out, n_groups] -> [out, cols]: each group's value repeated over its columns."""
    return t.repeat_interleave(group, dim=1)[:, :cols]


def dequantize(codes: Tensor, scale: Tensor, zero: Tensor, group_size: int) -> Tensor:
    """ŵ = (q − zero) · scale, fp32 [out, in]; group_size -1 means one group per row."""
    cols = codes.shape[1]
    g = cols if group_size == -1 else group_size
    s, z = expand_groups(scale.float(), g, cols), expand_groups(zero.float(), g, cols)
    return (codes.float() - z) * s


def lut_dequantize(codes: Tensor, lut: Tensor, group_size: int) -> Tensor:
    """Ŵ [out, in] fp32 from codes uint8 [out, in] and tables lut [out, n_groups, 2^bits]."""
    out, cols = codes.shape
    levels = lut.shape[2]
    g = cols if group_size == -1 else group_size
    group = torch.arange(cols, device=codes.device) // g
    flat = group[None, :] * levels + codes.long()  # index into each row's tables laid end to end
    return lut.float().reshape(out, -1).gather(1, flat)


# FP4 (E2M1) weights in compressed-tensors' nvfp4 / mxfp4 layouts


def e2m1_values() -> Tensor:
    """fp32 [16]: the value of each E2M1 code. Bit 3 is the sign, bits 0-2 index the magnitudes
    [0, 0.5, 1, 1.5, 2, 3, 4, 6] (code 8 is -0.0)."""
    mags = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
    return torch.cat([mags, -mags])


def pack_fp4(codes: Tensor) -> Tensor:
    """uint8 E2M1 codes [rows, cols] in [0, 16), cols even -> uint8 [rows, cols/2]: column 2j in the LOW
    nibble of byte j, column 2j+1 in the high nibble (compressed-tensors' `weight_packed` for FP4)."""
    rows, cols = codes.shape
    if cols % 2:
        raise ValueError(f"FP4 packs two codes per byte: cols must be even, got {cols}")
    if codes.numel() and int(codes.max()) > 15:
        raise ValueError("FP4 codes must be in [0, 16)")
    c = codes.to(torch.uint8)
    return (c[:, 0::2] | (c[:, 1::2] << 4)).contiguous()


def unpack_fp4(packed: Tensor, cols: int) -> Tensor:
    """uint8 [rows, cols/2] -> uint8 E2M1 codes [rows, cols]; inverse of pack_fp4."""
    if packed.dtype != torch.uint8 or packed.dim() != 2 or cols % 2 or packed.shape[1] * 2 != cols:
        raise ValueError(f"FP4 weight_packed must be uint8 [rows, {cols // 2}] for {cols} (even) columns, "
                         f"got {packed.dtype} {tuple(packed.shape)}")
    return torch.stack((packed & 0xF, packed >> 4), -1).reshape(packed.shape[0], cols)


def e8m0_to_float(scale: Tensor) -> Tensor:
    """uint8 E8M0 exponents -> fp32 2^(scale − 127), built from the bits: 0 is 2^-127 (a subnormal),
    255 is NaN (OCP MX spec)."""
    e = scale.to(torch.int32)
    bits = torch.where(e == 0, 0x00400000, torch.where(e == 255, 0x7FC00000, e << 23))
    return bits.to(torch.int32).view(torch.float32)


def dequantize_fp4(packed: Tensor, scale: Tensor, global_scale: Tensor | None, group_size: int, cols: int
                   ) -> Tensor:
    """fp32 Ŵ [rows, cols] from compressed-tensors FP4 tensors; groups of `group_size` run along cols.

    packed: uint8 `weight_packed` [rows, cols/2], two E2M1 codes a byte (pack_fp4: even column in
        the low nibble), decoded with e2m1_values().
    NVFP4 (group 16): scale float8_e4m3fn [rows, cols/16], global_scale fp32 [1];
        Ŵ = e2m1 · (float(scale) / global_scale).
    MXFP4 (group 32): scale uint8 [rows, cols/32] E8M0 exponents, global_scale None;
        Ŵ = e2m1 · 2^(scale − 127).
    cols must be a multiple of group_size.
    """
    rows = packed.shape[0]
    if group_size < 1 or cols % group_size:
        raise ValueError(f"cols ({cols}) must be a multiple of group_size ({group_size})")
    if scale.shape != (rows, cols // group_size):
        raise ValueError(f"FP4 weight_scale must be [{rows}, {cols // group_size}], got {tuple(scale.shape)}")
    if scale.dtype == torch.uint8:
        if global_scale is not None:
            raise ValueError("MXFP4 (uint8 E8M0 scales) takes no global_scale")
        s = e8m0_to_float(scale)
    elif scale.dtype == torch.float8_e4m3fn:
        if global_scale is None or global_scale.numel() != 1:
            raise ValueError("NVFP4 (float8_e4m3fn scales) needs a one-element global_scale")
        s = scale.float() / global_scale.float().reshape(())
    else:
        raise ValueError(f"FP4 weight_scale must be uint8 (MXFP4) or float8_e4m3fn (NVFP4), got {scale.dtype}")
    values = e2m1_values().to(packed.device)[unpack_fp4(packed, cols).long()]
    return values * expand_groups(s, group_size, cols)
