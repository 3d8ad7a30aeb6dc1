import pytest
import torch

from compress.pack import pack_codes, packed_words, unpack_codes


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("shape", [(1, 1), (3, 31), (5, 32), (7, 33), (4, 100), (2, 576)])
def test_pack_round_trip_is_exact(bits, shape):
    g = torch.Generator().manual_seed(bits * 1000 + shape[1])
    codes = torch.randint(0, 2**bits, shape, generator=g, dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.int32 and packed.shape == (shape[0], packed_words(shape[1], bits))
    assert torch.equal(unpack_codes(packed, bits, shape[1]), codes)


def test_four_bit_layout_is_eight_nibbles_per_word_lsb_first():
    codes = torch.arange(8, dtype=torch.uint8).reshape(1, 8)  # c_i = i
    assert pack_codes(codes, 4).item() == 0x76543210


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
def test_words_equal_compressed_tensors_packing(bits):
    ct = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    codes = torch.randint(0, 2**bits, (6, 75), generator=torch.Generator().manual_seed(bits), dtype=torch.uint8)
    signed = (codes.to(torch.int16) - 2 ** (bits - 1)).to(torch.int8)  # compressed-tensors packs signed values
    assert torch.equal(pack_codes(codes, bits), ct.pack_to_int32(signed, bits))
    back = ct.unpack_from_int32(pack_codes(codes, bits), bits, torch.Size(codes.shape))
    assert torch.equal(back, signed)


def test_pack_rejects_codes_wider_than_bits():
    with pytest.raises(ValueError, match="3 bits"):
        pack_codes(torch.tensor([[8]], dtype=torch.uint8), 3)


@pytest.mark.parametrize("bits", range(1, 9))
def test_byte_paths_and_row_chunks_equal_the_bit_stream(bits):
    """4 and 8 bits skip the bit stream, wider matrices pack in row chunks: the words are the same."""
    from compress.pack import _pack_bit_stream

    codes = torch.randint(0, 2**bits, (300, 4099), generator=torch.Generator().manual_seed(bits), dtype=torch.uint8)
    assert torch.equal(pack_codes(codes, bits), _pack_bit_stream(codes, bits))


@pytest.mark.parametrize("bits", [3, 4, 8])
@pytest.mark.parametrize("rows", [0, 1])
def test_a_transposed_column_packs_like_its_copy(bits, rows):
    """Per-row zero points [out, 1] are packed as [1, out]: a view whose row stride is 1."""
    col = torch.randint(0, 2**bits, (576, rows), generator=torch.Generator().manual_seed(bits), dtype=torch.uint8)
    view = col.t()
    assert torch.equal(pack_codes(view, bits), pack_codes(view.clone(), bits))
    assert torch.equal(unpack_codes(pack_codes(view, bits), bits, 576), view)
