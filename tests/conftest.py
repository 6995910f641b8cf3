import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def child_env(**extra) -> dict:
    """The environment of a command the tests start: this checkout first on PYTHONPATH, the
    caller's PYTHONPATH kept (the GPU machine's carried packages are there)."""
    path = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    return {**os.environ, "PYTHONPATH": path, **extra}


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread while the tiny networks run in this process: they are thousands of small
    operations (the caption decoder's beam search most), and with torch's two threads each one
    waits for the other at a barrier, which on a busy 2-core machine took ten times longer."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_model_folder(tmp_path_factory) -> Path:
    """A model folder of random tiny weights, written by convert_weights.py as a user would."""
    import subprocess
    base = tmp_path_factory.mktemp("tiny")
    r = subprocess.run([sys.executable, str(ROOT / "convert_weights.py"), "--random", "tiny", "--out", base / "model"],
                       capture_output=True, text=True, env=child_env(), cwd=ROOT)
    assert r.returncode == 0, r.stderr
    return base / "model"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; torch.cuda.is_available() is False here")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def input_images(folder: Path) -> dict[str, Path]:
    """Input images of every kind the tasks that read images meet, in `folder`. Readable: an RGB PNG
    larger than the tests' 32x32 (odd width: the crop's offsets), one smaller (upscaled), an
    animated GIF (the first frame is used), 16-bit grey and palette PNGs, an RGBA PNG and a CMYK
    JPEG (converted by PIL, as the original's Image.open().convert('RGB')), and the GIF's first
    frame alone. Refused: not an image, truncated PNG and JPEG, and two decompression bombs (PNG
    headers claiming 10^8 and 10^10 pixels: PIL warns about the first and refuses the second)."""
    import io
    import struct
    import zlib

    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)

    def pixels(h, w, c=3):
        return rng.integers(0, 256, (h, w, c), dtype=np.uint8)

    paths = {}

    def save(name, img, **kw):
        paths[name] = folder / name
        img.save(paths[name], **kw)

    save("big.png", Image.fromarray(pixels(50, 71)))
    save("small.png", Image.fromarray(pixels(24, 20)))
    first, second = Image.fromarray(pixels(40, 36)), Image.fromarray(pixels(40, 36))
    save("anim.gif", first, save_all=True, append_images=[second], duration=100, loop=0)
    save("first_frame.png", Image.open(paths["anim.gif"]).convert("RGB"))
    save("grey16.png", Image.fromarray((rng.integers(0, 65536, (38, 45))).astype(np.uint16)))
    save("palette.png", Image.fromarray(pixels(40, 44)).convert("P"))
    save("rgba.png", Image.fromarray(pixels(44, 40, 4), "RGBA"))
    save("cmyk.jpg", Image.fromarray(pixels(40, 50)).convert("CMYK"), quality=95)

    paths["not_image.png"] = folder / "not_image.png"
    paths["not_image.png"].write_text("a text file, not a picture\n")
    whole = folder / "whole.png"
    Image.fromarray(pixels(64, 64)).save(whole)           # random pixels: the data does not compress
    paths["truncated.png"] = folder / "truncated.png"
    paths["truncated.png"].write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    whole.unlink()
    jpeg = io.BytesIO()
    Image.fromarray(pixels(64, 64)).save(jpeg, format="JPEG", quality=95)
    paths["truncated.jpg"] = folder / "truncated.jpg"
    paths["truncated.jpg"].write_bytes(jpeg.getvalue()[:1500])

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    for name, side in (("bomb.png", 10_000), ("huge_bomb.png", 100_000)):
        header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)         # 8-bit RGB
        paths[name] = folder / name
        paths[name].write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                                + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b""))
    return paths


def copy_without_task_networks(model: Path, dst: Path) -> Path:
    """A copy of a model folder as convert_weights.py wrote it before the VAE encoder, the CLIP image
    tower and the caption decoder (with its tokenizer) were networks: neither their files nor their
    manifest entries."""
    import json
    import shutil

    shutil.copytree(model, dst, ignore=shutil.ignore_patterns("trtllm", "engines"))
    manifest = json.loads((dst / "manifest.json").read_text())
    for name in list(manifest["files"]):
        if name.split(".")[0] in ("vae_encoder", "image_encoder", "caption_decoder") or name.startswith("caption_tokenizer/"):
            del manifest["files"][name]
            (dst / name).unlink()
    (dst / "caption_tokenizer").rmdir()
    (dst / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return dst
