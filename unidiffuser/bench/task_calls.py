"""One call of a task as its user waits for it, for each path: input file -> outputs on disk.

Ours: UniDiffuser.generate (reading the image file, encoding, the solver runs, decoding,
captioning), then Generation.save (PNGs, texts, sidecars). diffusers: its UniDiffuserPipeline in
the task's mode (peers.PEER_MODES; the two-stage tasks chain two calls), reading the same file
with PIL and writing its images and texts. Each call returns the seconds of its stages."""
from __future__ import annotations

import itertools
import time
from pathlib import Path

import numpy as np

from ..tasks import TASKS
from . import PROMPT
from .peers import PEER_MODES

GUIDANCE = 7.0
STAGES = ("encode_s", "sample_s", "caption_s", "decode_s")    # ours' split: Generation.timings


def write_input_image(path: Path, size: int) -> Path:
    """A size x size PNG like a photograph (smooth colour gradients, a disc, mild grain), fixed."""
    from PIL import Image
    y, x = np.mgrid[0:size, 0:size] / max(size - 1, 1)
    disc = ((x - 0.6) ** 2 + (y - 0.4) ** 2 < 0.05).astype(float)
    rgb = np.stack([0.2 + 0.6 * x, 0.3 + 0.5 * y * (1 - x), 0.8 - 0.5 * y + 0.3 * disc], -1)
    rgb += np.random.default_rng(0).normal(0, 0.03, rgb.shape)
    Image.fromarray((rgb.clip(0, 1) * 255).round().astype(np.uint8)).save(path, format="PNG")
    return path


def task_input(task: str, image_file: Path):
    """What the user hands the task: the prompt, the image file, or nothing."""
    return {"prompt": PROMPT.format(0), "image": str(image_file), None: None}[TASKS[task].input]


def ours_call(api, task: str, source, B: int, args, out: Path):
    """One request of B samples through the API, saved to a fresh folder under `out`."""
    runs = itertools.count()

    def call() -> dict:
        gen = api.generate(task, source, n=B, steps=args.steps, scale=GUIDANCE, height=args.size, width=args.size)
        t = time.perf_counter()
        gen.save(out / f"ours-{task}-{B}-{next(runs)}")
        stages = {k: v for k, v in gen.timings.items() if k != "total_s"}
        stages["save_s"] = time.perf_counter() - t
        return stages
    return call


def diffusers_call(pipe, task: str, source, B: int, args, out: Path):
    """The same request through diffusers' pipeline, saved to a fresh folder under `out`."""
    runs = itertools.count()

    def call() -> dict:
        images, texts = peer_generate(pipe, task, source, B, args)
        t = time.perf_counter()
        save_outputs(out / f"diffusers-{task}-{B}-{next(runs)}", images, texts)
        return {"save_s": time.perf_counter() - t}
    return call


def peer_generate(pipe, task: str, source, B: int, args) -> tuple[list, list[str]]:
    """The task's outputs (PIL images, texts) from diffusers, its modes chained: each mode's
    output is the next one's input (a caption as the prompt, an image as the image)."""
    from PIL import Image
    kw = dict(num_inference_steps=args.steps, guidance_scale=GUIDANCE, height=args.size, width=args.size)
    x = Image.open(source).convert("RGB") if TASKS[task].input == "image" else source
    images, texts = [], []
    for mode in PEER_MODES[task]:
        images, texts = peer_mode(pipe, mode, x, B, kw)
        x = texts if mode == "img2text" else images
    return images, texts


def peer_mode(pipe, mode: str, x, B: int, kw: dict) -> tuple[list, list[str]]:
    """One diffusers call in `mode`: B samples of one input x, or one sample of each of a list."""
    if mode == "text2img":
        pipe.set_text_to_image_mode()
        return pipe(prompt=x, num_images_per_prompt=1 if isinstance(x, list) else B, **kw).images, []
    if mode == "img2text":
        pipe.set_image_to_text_mode()
        if isinstance(x, list):     # the images of a first stage: diffusers reads one PIL image a call
            return [], [t for img in x for t in pipe(image=img, num_prompts_per_image=1, **kw).text]
        return [], pipe(image=x, num_prompts_per_image=B, **kw).text
    if mode == "joint":
        pipe.set_joint_mode()
        r = pipe(num_images_per_prompt=B, num_prompts_per_image=B, **kw)
        return r.images, r.text
    if mode == "img":
        pipe.set_image_mode()
        return pipe(num_images_per_prompt=B, **kw).images, []
    pipe.set_text_mode()
    return [], pipe(num_prompts_per_image=B, **kw).text


def save_outputs(folder: Path, images: list, texts: list[str]) -> None:
    folder.mkdir(parents=True)
    for i, img in enumerate(images):
        img.save(folder / f"{i:03d}.png", format="PNG")
    for i, text in enumerate(texts):
        (folder / f"{i:03d}.txt").write_text(text + "\n", encoding="utf-8")
