"""Dense bit packing of unsigned integer codes of any width from 2 to 8 bits.

Layout (a little-endian bit stream): code ``i`` of a ``b``-bit tensor occupies stream bits ``i*b .. i*b + b - 1``,
least significant bit first, and stream bit ``k`` is bit ``k mod 8`` of byte ``k // 8``. ``n`` codes take
``ceil(n * b / 8)`` bytes; the unused high bits of the last byte are zero. 2-, 4- and 8-bit codes never straddle a
byte; 3-, 5-, 6- and 7-bit codes do (eight 3-bit codes fill exactly three bytes, four 6-bit codes three bytes).

Vectorised with numpy: ``unpackbits`` turns the ``[n]`` uint8 codes into an ``[n, 8]`` bit matrix (LSB first), its
first ``b`` columns flattened row by row are exactly the bit stream above, and ``packbits`` turns the stream into
bytes. Unpacking runs the same two steps backwards. No Python loop touches individual codes.
"""

from __future__ import annotations

import numpy as np
import torch

from gmpq.quant.functional import MAX_BITS, MIN_BITS


def _check(bits: int) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"packed bit width must be an integer in {MIN_BITS}..{MAX_BITS}, got {bits!r}")
    return bits


def packed_nbytes(count: int, bits: int) -> int:
    """Bytes taken by ``count`` codes of ``bits`` bits: ``ceil(count * bits / 8)``."""
    return -(-count * _check(bits) // 8)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned integer ``codes`` (any shape, values in ``[0, 2^bits)``) into a flat uint8 tensor.

    The result has ``packed_nbytes(codes.numel(), bits)`` bytes; a value out of range raises ``ValueError``.
    """
    _check(bits)
    flat = codes.detach().reshape(-1).cpu()
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 1 << bits):
        raise ValueError(f"codes must lie in [0, {(1 << bits) - 1}] to pack at {bits} bits, "
                         f"got [{int(flat.min())}, {int(flat.max())}]")
    as_bytes = flat.to(torch.uint8).numpy()
    stream = np.unpackbits(as_bytes[:, None], axis=1, bitorder="little")[:, :bits]
    return torch.from_numpy(np.packbits(stream.reshape(-1), bitorder="little"))


def unpack_codes(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: the first ``count`` ``bits``-bit codes of ``packed`` as a flat uint8 tensor.

    Raises ``ValueError`` unless ``packed`` is a flat uint8 tensor of exactly ``packed_nbytes(count, bits)`` bytes.
    """
    expected = packed_nbytes(count, bits)
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != expected:
        raise ValueError(f"{count} codes of {bits} bits need a flat uint8 tensor of {expected} bytes, got "
                         f"{packed.dtype} of shape {tuple(packed.shape)}")
    stream = np.unpackbits(packed.cpu().numpy(), bitorder="little", count=count * bits).reshape(count, bits)
    return torch.from_numpy(np.packbits(stream, axis=1, bitorder="little").reshape(count))
