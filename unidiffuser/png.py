"""PNG files written fast enough to stay off a request's critical path.

PIL's encoder chooses a filter for every row and deflates the whole image on one core, which
for an image that looks like noise (what random weights make) costs as much as a tenth of the
diffusion itself. Here every row takes PNG's "Up" filter (the difference from the row above:
one numpy subtraction; good for photographs too), and horizontal slices of rows are deflated
on several threads at the fastest level (zlib releases the GIL), joined into one stream as
pigz does: every slice but the last ends with a sync flush, on a byte boundary, so the raw
deflate blocks simply concatenate. Lossless: a decoder gets exactly the pixels.
"""
from __future__ import annotations

import os
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

LEVEL = 1                  # zlib's fastest real compression; higher levels buy a few percent of size
SLICE_ROWS = 64            # rows per deflate job: enough data per job to outweigh its dispatch
COLOR_TYPES = {"L": 0, "RGB": 2, "RGBA": 6}
_pool: ThreadPoolExecutor | None = None


def _threads() -> ThreadPoolExecutor:
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(min(8, os.cpu_count() or 1), thread_name_prefix="unidiffuser-png")
    return _pool


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(data, zlib.crc32(kind)))


def _deflate(rows: np.ndarray, last: bool) -> bytes:
    c = zlib.compressobj(LEVEL, zlib.DEFLATED, -15)       # raw deflate: the zlib wrapper is written once
    return c.compress(rows) + c.flush(zlib.Z_FINISH if last else zlib.Z_SYNC_FLUSH)


def encode(image) -> bytes:
    """The PNG file of a PIL image (mode L, RGB or RGBA; 8 bits per channel) as bytes."""
    if image.mode not in COLOR_TYPES:
        raise ValueError(f"image: mode {image.mode!r} cannot be written here; expected one of {sorted(COLOR_TYPES)}")
    pixels = np.asarray(image, dtype=np.uint8)
    h, w = pixels.shape[:2]
    flat = pixels.reshape(h, -1)
    rows = np.empty((h, 1 + flat.shape[1]), np.uint8)
    rows[:, 0] = 2                                      # filter type 2, Up
    rows[0, 1:] = flat[0]                               # the row above the first is zeros
    np.subtract(flat[1:], flat[:-1], out=rows[1:, 1:])  # uint8: modulo 256, as PNG defines it
    parts = [rows[i:i + SLICE_ROWS] for i in range(0, h, SLICE_ROWS)]
    lasts = [i == len(parts) - 1 for i in range(len(parts))]
    if len(parts) == 1:
        deflated = [_deflate(parts[0], True)]
    else:
        deflated = list(_threads().map(_deflate, parts, lasts))
    stream = b"\x78\x01" + b"".join(deflated) + struct.pack(">I", zlib.adler32(rows))
    header = struct.pack(">IIBBBBB", w, h, 8, COLOR_TYPES[image.mode], 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", stream) + _chunk(b"IEND", b"")


def save(image, path: str | Path) -> None:
    """Write `image` as a PNG file at `path`."""
    Path(path).write_bytes(encode(image))
