"""Input images: read safely, converted and cropped as the original does.

The original reads `Image.open(f).convert('RGB')` (an animated file's first frame; palette,
RGBA, CMYK, 16-bit and grey images converted by PIL), takes the centred square of side
min(h, w) and resizes it with Lanczos to the resolution (`utils.center_crop`), so an image
smaller than the resolution is upscaled: the sidecar says so.
"""
from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass
from pathlib import Path

from .limits import InputError, InputTypeError

MAX_FILE_BYTES = 256 << 20        # beyond this no photograph is plausible; refuse before reading it


@dataclass
class InputImage:
    image: object                 # PIL.Image.Image, RGB, as read (before cropping)
    name: str                     # the file's name, or "image" for a PIL image given directly
    sha256: str                   # of the file's bytes, or of the RGB pixels

    def describe(self, width: int, height: int) -> dict:
        """What a sidecar records about this input at the given resolution."""
        w, h = self.image.size
        out = {"name": self.name, "sha256": self.sha256, "size": [w, h]}
        if min(w, h) < max(width, height):
            out["upscaled"] = True    # its centre square was smaller than the output: Lanczos upsampled it
        return out


def read_image(path, param: str = "image") -> InputImage:
    """An image file, checked: one InputError naming the file for anything that is not a readable
    image (missing, a folder, not an image, truncated, a decompression bomb)."""
    path = Path(path)
    if not path.exists():
        raise InputError(param, "{%s} {0}: file not found" % param, path)
    if not path.is_file():
        raise InputError(param, "{%s} {0}: not a file" % param, path)
    _check_size(path.stat().st_size, path, param)
    return _decode(path.read_bytes(), path, path.name, param)


def read_image_bytes(data: bytes, name: str = "image", param: str = "image") -> InputImage:
    """An image file's bytes (an upload), checked as read_image checks a file: one InputError
    naming `name` for anything that is not a readable image (too large, not an image, truncated,
    a decompression bomb)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise InputTypeError(param, "{%s} must be the bytes of an image file, got {0}" % param, type(data).__name__)
    data = bytes(data)
    _check_size(len(data), name, param)
    return _decode(data, name, name, param)


def _check_size(size: int, label, param: str) -> None:
    if size > MAX_FILE_BYTES:
        raise InputError(param, "{%s} {0}: {1} MiB, larger than the {2} MiB accepted" % param,
                         label, size >> 20, MAX_FILE_BYTES >> 20)


def _decode(data: bytes, label, name: str, param: str) -> InputImage:
    """The checks and the conversion every input image goes through (`label` names it in errors)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            # PIL warns past MAX_IMAGE_PIXELS and raises past twice that: both refused here.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            # The same limit, checked without the warnings filter: catch_warnings is process-wide,
            # so in a threaded caller (the server) another thread may have reset the filter.
            limit = Image.MAX_IMAGE_PIXELS
            if limit is not None and max(1, img.size[0]) * max(1, img.size[1]) > limit:
                raise Image.DecompressionBombWarning(
                    f"Image size ({img.size[0] * img.size[1]} pixels) exceeds limit of {limit} pixels, "
                    "could be decompression bomb DOS attack.")
            img.load()                     # the first frame of an animation, as convert() reads it
            img = img.convert("RGB")
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        raise InputError(param, "{%s} {0}: too many pixels to be a photograph ({1})" % param, label, e) from None
    except UnidentifiedImageError:
        raise InputError(param, "{%s} {0}: not an image PIL can read" % param, label) from None
    except (OSError, ValueError, SyntaxError) as e:    # truncated or corrupt data
        raise InputError(param, "{%s} {0}: not a readable image ({1})" % param, label, e) from None
    return InputImage(img, name, hashlib.sha256(data).hexdigest())


def as_input(image, param: str = "image") -> InputImage:
    """A path, a PIL image or an InputImage, as an InputImage."""
    from PIL import Image

    if isinstance(image, InputImage):
        return image
    if isinstance(image, (str, Path)):
        return read_image(image, param)
    if isinstance(image, Image.Image):
        rgb = image.convert("RGB")
        return InputImage(rgb, "image", hashlib.sha256(rgb.tobytes()).hexdigest())
    raise InputTypeError(param, "{%s} must be a file path or a PIL image, got {0}" % param, type(image).__name__)


def center_crop(image, width: int, height: int):
    """The centred square of side min(w, h), resized with Lanczos to width x height (PIL, RGB)."""
    from PIL import Image

    w, h = image.size
    side = min(w, h)
    top, left = (h - side) // 2, (w - side) // 2
    return image.crop((left, top, left + side, top + side)).resize((width, height), Image.LANCZOS)
