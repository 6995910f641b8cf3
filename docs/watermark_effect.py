"""What the original's watermark (thu-ml/unidiffuser utils.add_water, applied to every PNG that
sample_multi_v1.py saves) does to the pixels outside its logo: the image is resized 4x up with
Lanczos, the logo drawn in the bottom-right corner, and resized back down with Lanczos. The mechanism
is re-implemented here (PIL's default font for the logo text); only pixels away from the logo box
are counted.

    python docs/watermark_effect.py      # matplotlib (requirements-dev.txt) ships the sample photo
"""
import numpy as np
import PIL
from matplotlib import cbook
from PIL import Image, ImageDraw

SCALE = 4


def stamp(img: Image.Image) -> tuple[Image.Image, float, float]:
    """The watermarked image and the top-left corner of the logo box, in output pixels."""
    w, h = img.size
    canvas = Image.new(img.mode, (w * SCALE, h * SCALE), (255, 255, 255))
    canvas.paste(img.resize(canvas.size, Image.LANCZOS), (0, 0))
    # logo box size and margins as the original's (text 27% x 5% of the width at half scale)
    dw, dh = int(w * SCALE * 0.27 * 0.5), w * SCALE * 0.05 * 0.5
    x, y = w * SCALE - dw, h * SCALE - dh
    draw = ImageDraw.Draw(canvas)
    draw.rounded_rectangle((x - 17.5, y - 17.5, x - 2.5 + dw, y - 2.5 + dh), radius=12, fill=(223, 230, 233))
    draw.text((x - 10, y - 10), "UniDiffuser", fill=(107, 92, 231))
    return canvas.resize((w, h), Image.LANCZOS), (x - 17.5) / SCALE, (y - 17.5) / SCALE


def report(name: str, arr: np.ndarray) -> None:
    out, x0, y0 = stamp(Image.fromarray(arr))
    diff = np.abs(np.asarray(out, dtype=np.int16) - arr.astype(np.int16)).max(-1)
    away = np.ones(diff.shape, bool)
    away[int(y0) - 4:, int(x0) - 4:] = False     # the logo box and the Lanczos support around it
    d = diff[away]
    print(f"{name}: {np.mean(d > 0):.1%} of pixels away from the logo change; levels: max {d.max()}, "
          f"99th percentile {np.percentile(d, 99):.0f}, mean {d.mean():.2f}")


def main() -> None:
    rng = np.random.default_rng(0)
    print("pillow", PIL.__version__)
    with cbook.get_sample_data("grace_hopper.jpg") as f:
        photo = Image.open(f).convert("RGB")
    w, h = photo.size
    c = min(w, h)
    photo = photo.crop(((w - c) // 2, (h - c) // 2, (w + c) // 2, (h + c) // 2)).resize((512, 512), Image.LANCZOS)
    report("photo (matplotlib's grace_hopper.jpg, 512x512 centre crop)", np.asarray(photo))
    report("uniform noise 512x512", rng.integers(0, 256, (512, 512, 3), dtype=np.uint8))
    smooth = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).resize((512, 512), Image.BICUBIC)
    report("smooth (32x32 noise, bicubic to 512x512)", np.asarray(smooth))


if __name__ == "__main__":
    main()
