"""Dense bit packing of 2..8-bit codes (gmpq.hub.packing) against an independent bit-by-bit reference."""

from __future__ import annotations

import pytest
import torch

from gmpq.hub.packing import pack_codes, packed_nbytes, unpack_codes


def reference_pack(codes: list[int], bits: int) -> bytes:
    """The documented layout, one bit at a time: code i at stream bits i*b.., LSB first; bit k in byte k // 8."""
    out = bytearray((len(codes) * bits + 7) // 8)
    for i, code in enumerate(codes):
        for j in range(bits):
            k = i * bits + j
            if (code >> j) & 1:
                out[k // 8] |= 1 << (k % 8)
    return bytes(out)


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("count", [0, 1, 3, 7, 8, 9, 24, 1001])
def test_pack_matches_reference_and_round_trips(bits: int, count: int) -> None:
    codes = torch.randint(0, 2**bits, (count,))
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.dim() == 1
    assert packed.numel() == packed_nbytes(count, bits) == -(-count * bits // 8)
    assert bytes(packed.tolist()) == reference_pack(codes.tolist(), bits)
    assert torch.equal(unpack_codes(packed, bits, count), codes.to(torch.uint8))


def test_known_layouts_including_codes_across_byte_boundaries() -> None:
    # four 2-bit codes per byte, first code in the lowest bits
    assert pack_codes(torch.tensor([1, 2, 3, 0]), 2).tolist() == [1 | 2 << 2 | 3 << 4]
    # eight 3-bit codes fill three bytes; code 2 straddles bytes 0 and 1, code 5 bytes 1 and 2
    codes = list(range(8))
    word = sum(c << (3 * i) for i, c in enumerate(codes))
    assert pack_codes(torch.tensor(codes), 3).tolist() == list(word.to_bytes(3, "little"))
    # four 6-bit codes fill three bytes
    codes = [63, 1, 42, 17]
    word = sum(c << (6 * i) for i, c in enumerate(codes))
    assert pack_codes(torch.tensor(codes), 6).tolist() == list(word.to_bytes(3, "little"))
    # a partial last byte keeps its unused high bits zero
    assert pack_codes(torch.tensor([7, 7, 7]), 3).tolist() == [0xFF, 0x01]


def test_any_shape_packs_flattened_in_row_major_order() -> None:
    codes = torch.randint(0, 8, (4, 3, 2, 5))
    assert torch.equal(pack_codes(codes, 3), pack_codes(codes.reshape(-1), 3))
    assert torch.equal(unpack_codes(pack_codes(codes, 3), 3, codes.numel()).reshape(codes.shape),
                       codes.to(torch.uint8))


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError, match=r"\[0, 7\]"):
        pack_codes(torch.tensor([0, 8]), 3)
    with pytest.raises(ValueError, match=r"\[0, 3\]"):
        pack_codes(torch.tensor([-1, 0]), 2)
    for bits in (1, 9, 32):
        with pytest.raises(ValueError, match="2..8"):
            pack_codes(torch.tensor([0]), bits)
    packed = pack_codes(torch.tensor([1, 2, 3, 4, 5]), 3)
    with pytest.raises(ValueError, match="2 bytes"):
        unpack_codes(packed[:1], 3, 5)
    with pytest.raises(ValueError, match="uint8"):
        unpack_codes(packed.to(torch.int16), 3, 5)
