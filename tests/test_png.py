"""The PNG writer (unidiffuser/png.py): what PIL and zlib read back is exactly what was written."""
import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from unidiffuser import png


@pytest.mark.parametrize("shape, mode", [
    ((512, 512, 3), "RGB"),        # several slices, joined into one stream
    ((513, 257, 3), "RGB"),        # a last slice of one row
    ((64, 64), "L"),               # exactly one slice
    ((100, 37, 4), "RGBA"),
    ((1, 1, 3), "RGB"),
])
def test_pixels_round_trip(shape, mode):
    pixels = np.random.default_rng(sum(shape)).integers(0, 256, shape, dtype=np.uint8)
    data = png.encode(Image.fromarray(pixels, mode))
    Image.open(io.BytesIO(data)).verify()                 # chunk CRCs and structure
    back = Image.open(io.BytesIO(data))
    assert back.mode == mode and back.size == (shape[1], shape[0])
    assert np.array_equal(np.asarray(back), pixels)


def test_one_zlib_stream_with_its_checksum():
    """IDAT holds one zlib stream whose Adler-32 zlib itself checks: the slices joined as one."""
    pixels = np.random.default_rng(1).integers(0, 256, (300, 200, 3), dtype=np.uint8)
    data = png.encode(Image.fromarray(pixels))
    pos, idat = 8, b""
    while pos < len(data):
        (length,), kind = struct.unpack(">I", data[pos:pos + 4]), data[pos + 4:pos + 8]
        if kind == b"IDAT":
            idat += data[pos + 8:pos + 8 + length]
        pos += 12 + length
    raw = zlib.decompress(idat)                            # raises on a wrong Adler-32 or a broken stream
    assert len(raw) == 300 * (1 + 200 * 3)


def test_smooth_images_compress():
    """The Up filter earns its keep on smooth content (a gradient: nearly every difference zero)."""
    ramp = np.broadcast_to(np.arange(512, dtype=np.uint16)[:, None, None] // 2, (512, 512, 3)).astype(np.uint8)
    assert len(png.encode(Image.fromarray(ramp))) < ramp.nbytes / 50


def test_save_writes_the_file(tmp_path):
    img = Image.fromarray(np.full((8, 8, 3), 7, np.uint8))
    png.save(img, tmp_path / "a.png")
    assert np.array_equal(np.asarray(Image.open(tmp_path / "a.png")), np.asarray(img))


def test_an_unsupported_mode_is_one_line():
    with pytest.raises(ValueError, match=r"mode 'CMYK'.*expected one of"):
        png.encode(Image.new("CMYK", (4, 4)))
