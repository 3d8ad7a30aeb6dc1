"""Bit packing of integer codes into int32 words: compressed-tensors' `pack-quantized` layout.

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
    pad = -cols % 32
    c = torch.nn.functional.pad(codes.to(torch.uint8), (0, pad)).reshape(rows, -1, 32)
    shifts = torch.arange(bits, dtype=torch.uint8, device=codes.device)
    stream = ((c.unsqueeze(-1) >> shifts) & 1).reshape(rows, -1, bits, 32)  # bit k of code i at i·bits + k
    weights = torch.ones(32, dtype=torch.int64, device=codes.device) << torch.arange(32, device=codes.device)
    words = (stream.to(torch.int64) * weights).sum(-1)  # [rows, chunks, bits], each in [0, 2^32)
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    return words.reshape(rows, -1)[:, : packed_words(cols, bits)].contiguous()


def unpack_codes(packed: Tensor, bits: int, cols: int) -> Tensor:
    """int32 words [rows, ceil(cols·bits/32)] -> uint8 codes [rows, cols]; inverse of pack_codes."""
    _check_bits(bits)
    rows, n = packed.shape
    if n != packed_words(cols, bits):
        raise ValueError(f"{n} words per row cannot hold {cols} codes of {bits} bits")
    if bits == 4:  # whole nibbles: split bytes, no bit stream needed (little-endian words)
        b = packed.contiguous().view(torch.uint8).reshape(rows, -1)
        return torch.stack((b & 0xF, b >> 4), -1).reshape(rows, -1)[:, :cols]
    chunks = math.ceil(cols / 32)
    w = torch.nn.functional.pad(packed, (0, chunks * bits - n)).reshape(rows, chunks, bits, 1)
    stream = (w >> torch.arange(32, dtype=torch.int32, device=packed.device)) & 1  # [rows, chunks, bits, 32]
    stream = stream.reshape(rows, chunks, 32, bits).to(torch.uint8)
    codes = (stream << torch.arange(bits, dtype=torch.uint8, device=packed.device)).sum(-1, dtype=torch.uint8)
    return codes.reshape(rows, -1)[:, :cols]


def _check_bits(bits: int) -> None:
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in [1, 8], got {bits}")
