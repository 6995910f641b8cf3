"""Load once, generate many: the Python API, for every task.

    from unidiffuser import UniDiffuser
    pipe = UniDiffuser.load("model")                      # cuda + fp16 when there is a GPU
    out = pipe("an elephant under the sea", seed=1234, n=2)          # text -> image
    out.images[0].save("elephant.png")                    # PIL images; out.seeds, out.timings
    pipe.caption("photo.jpg").texts[0]                    # image -> text
    pipe.joint(n=2)                                       # images and their captions
    pipe.image(), pipe.text()                             # unconditional
    pipe.vary("photo.jpg"), pipe.vary_text("a red cube")  # image and text variation

Each input's n samples run as one batch; sample i, counting over all inputs, uses seed + i (or
seeds[i]), so any sample reproduces alone, and the same arguments give what `run.py` writes.
One request runs at a time per pipeline (a lock): the captured CUDA graphs and their input
buffers are shared by all calls.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from . import limits, options, png
from .files import output_stem, write_outputs
from .pipeline import Pipeline, Request
from .tasks import TASKS, check_backend

log = logging.getLogger("unidiffuser")


@dataclass
class Generation:
    images: list                      # PIL.Image.Image, RGB, one per sample (tasks that make images)
    prompts: list                     # the prompt of each sample (tasks whose input is a prompt), else None
    seeds: list[int]                  # the seed of each sample
    settings: dict                    # task, steps, scale, height, width, batch, backend, dtype, device, ...
    timings: dict[str, float] = field(default_factory=dict)   # seconds: encode/sample/decode/caption/capture, total
    _batch_timings: list[dict] = field(default_factory=list, repr=False)   # per sample: its batch's stages
    texts: list[str] = field(default_factory=list)            # one per sample (tasks that make texts)
    inputs: list = field(default_factory=list)                # per sample: the prompt, the image's record, or None

    @property
    def task(self) -> str:
        return self.settings.get("task", "t2i")

    def save(self, folder: str | Path, overwrite: bool = False, extra: dict | None = None) -> list[Path]:
        """Write each sample's outputs, NAME.png and/or NAME.txt, with a JSON sidecar NAME.json
        (task, input, seed, settings, the text, the timings of its batch, each file's sha256,
        and `extra`) into folder; returns the paths of the PNGs and texts. NAME derives from the
        input and the seed (t2i: PROMPT-SLUG_seedN, as run.py names it). All of them are published
        together, whole or not at all; an existing name is replaced only with overwrite=True
        (else FileExistsError names it and nothing is written)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        items, paths = [], []
        for i, (seed, t) in enumerate(zip(self.seeds, self._batch_timings)):
            inp = self.inputs[i] if self.inputs else self.prompts[i]
            stem = folder / output_stem(self.task, inp, seed)
            files = []
            if self.images:
                files.append((stem.with_suffix(".png"), lambda p, img=self.images[i]: png.save(img, p)))
            if self.texts:
                text = self.texts[i] + "\n"
                files.append((stem.with_suffix(".txt"), lambda p, text=text: Path(p).write_text(text, encoding="utf-8")))
            key = "prompt" if isinstance(inp, str) else "image"
            sidecar = {"task": self.task, **({key: inp} if inp is not None else {}), "seed": seed,
                       **({"text": self.texts[i]} if self.texts else {}), **self.settings, **(extra or {}),
                       "time_per_stage_s": {k: round(v, 4) for k, v in t.items()}}
            items.append((stem.with_suffix(".json"), files, sidecar))
            paths += [p for p, _ in files]
        write_outputs(items, overwrite)
        return paths


class UniDiffuser:
    """A converted model folder loaded once (see `load`); call it with prompts to get images, or
    use a task's method (caption, joint, image, text, vary, vary_text) or `generate`."""

    def __init__(self, pipeline: Pipeline, model_dir: Path, backend: str, precision: str):
        self.pipeline, self.model_dir, self.backend = pipeline, Path(model_dir), backend
        self.precision = precision      # what the sidecar calls it: fp32, fp16, bf16, fp8
        self._lock = threading.Lock()

    @classmethod
    def load(cls, model_dir: str | Path, device: str | None = None, dtype: str | None = None,
             backend: str = "torch", compile: bool = False, engine_dir: str | Path | None = None,
             cfg_pair=None) -> "UniDiffuser":
        """device: "cpu", "cuda" or "cuda:N" (default cuda when available); dtype: fp16 (default on
        CUDA), bf16, fp8 (the UViT blocks' linears in e4m3, Hopper or newer) or fp32 (default on
        the CPU, the reference); backend "torch" or "trtllm" (engine_dir, default
        MODEL_DIR/engines; text-to-image only); cfg_pair: this rank's half of a CFG pair under
        torchrun (`parallel.init_from_env(...).cfg_pair`). A bad option or model folder raises
        ValueError with one clear line naming it, before any weights are read. The networks of
        tasks other than text-to-image load on their first use."""
        return cls.from_options(model_dir, options.resolve(device, dtype, backend, compile, engine_dir), cfg_pair)

    @classmethod
    def from_options(cls, model_dir: str | Path, opts: options.Options, cfg_pair=None) -> "UniDiffuser":
        """Load with options already resolved (options.resolve)."""
        pipe = cls(Pipeline.from_dir(model_dir, opts, cfg_pair), Path(model_dir), opts.backend, opts.precision)
        if opts.dtype == "fp32" and pipe.weights_dtype not in (None, "fp32"):
            log.warning("fp32 on %s weights is not the fp32 reference (they were rounded at conversion); "
                        "the reference needs a folder made by convert_weights.py --dtype fp32", pipe.weights_dtype)
        return pipe

    @property
    def default_size(self) -> int:
        return self.pipeline.cfg.default_size

    @property
    def random_weights(self) -> bool:
        return bool(self.pipeline.manifest.get("random_weights"))

    @property
    def weights_dtype(self) -> str | None:
        """The dtype the model folder stores (convert_weights.py --dtype)."""
        return self.pipeline.manifest.get("dtype")

    @property
    def load_timings(self) -> dict[str, float]:
        """load_s (reading, checking and placing the weights) and imports_s (process start to loading)."""
        return dict(self.pipeline.load_timings)

    # -- the tasks -----------------------------------------------------------------------------

    def __call__(self, prompt: str | Sequence[str], **kwargs) -> Generation:
        """Images for one prompt or a list of prompts, n per prompt (see `generate`)."""
        return self.generate("t2i", prompt, **kwargs)

    def caption(self, image, **kwargs) -> Generation:
        """Captions (texts) of an image or a list of images: paths or PIL images."""
        return self.generate("i2t", image, **kwargs)

    def joint(self, **kwargs) -> Generation:
        """Images and their captions, generated together."""
        return self.generate("joint", None, **kwargs)

    def image(self, **kwargs) -> Generation:
        """Images, unconditionally."""
        return self.generate("i", None, **kwargs)

    def text(self, **kwargs) -> Generation:
        """Texts, unconditionally."""
        return self.generate("t", None, **kwargs)

    def vary(self, image, **kwargs) -> Generation:
        """Variations of an image (or of each of a list): image -> text latent -> image."""
        return self.generate("i2t2i", image, **kwargs)

    def vary_text(self, prompt, **kwargs) -> Generation:
        """Variations of a text (or of each of a list): text -> image latents -> text."""
        return self.generate("t2i2t", prompt, **kwargs)

    def generate(self, task: str, inputs=None, seed: int = 1234, n: int = 1, steps: int = 50, scale: float = 7.0,
                 height: int | None = None, width: int | None = None, seeds: Sequence[int] | None = None,
                 batch: int | None = None, progress: Callable[[int, int], None] | None = None) -> Generation:
        """Any task (tasks.TASKS) on its inputs (prompts, images, or None), n samples per input.

        seeds: one per sample (len(inputs) * n), instead of seed, seed + 1, ...; batch: samples
        per batch (default n: one batch per input; a batch may mix inputs); progress(batch, step)
        is called after each sampling step of each batch (a task of two solver runs counts
        2 x steps; on the CUDA-graph path, when the step is queued on the GPU)."""
        if task not in TASKS:
            raise limits.InputError("task", "{task} must be one of %s, got {0!r}" % ", ".join(TASKS), task)
        check_backend(task, self.backend)
        kind = TASKS[task].input
        each = self._inputs(kind, inputs)
        limits.check_int("n", n, 1, limits.MAX_BATCH)
        total = len(each) * n
        seeds = self._seeds(seed, seeds, total, len(each), n)
        batch = n if batch is None else batch
        limits.check_int("batch", batch, 1, limits.MAX_BATCH)
        height = self.default_size if height is None else height
        width = self.default_size if width is None else width
        each = [x for x in each for _ in range(n)]
        if kind == "image":   # imported here: a task that reads no image never needs the images' code
            from .images import center_crop
        batches = []
        for i in range(0, total, batch):
            chunk = each[i:i + batch]
            batches.append(Request([x for x in chunk if isinstance(x, str)], seeds[i:i + batch], steps, scale,
                                   height, width, task,
                                   [center_crop(x.image, width, height) for x in chunk] if kind == "image" else None))
        for req in batches:        # bad settings or seeds fail before any work
            req.validate()
        images, texts, per_sample, timings = self._run(batches, progress)
        p = self.pipeline
        settings = {"task": task, "steps": steps, "scale": scale, "height": height, "width": width, "batch": batch,
                    "backend": self.backend, "dtype": self.precision, "device": str(p.device),
                    "model_dir": str(self.model_dir), "random_weights": self.random_weights,
                    "weights_dtype": self.weights_dtype}
        records = [x if isinstance(x, str) or x is None else x.describe(width, height) for x in each]
        prompts = each if kind == "prompt" else [None] * total
        return Generation(images, prompts, seeds, settings, timings, per_sample, texts, records)

    def _run(self, batches: list[Request], progress):
        from PIL import Image

        images, texts, per_sample, timings = [], [], [], {}
        t0 = time.perf_counter()
        with self._lock:
            for b, req in enumerate(batches):
                cb = None if progress is None else (lambda k, b=b: progress(b, k))
                result = self.pipeline(req, progress=cb)
                if result.images is not None:
                    images += [Image.fromarray(img.numpy()) for img in result.images]
                texts += result.texts or []
                per_sample += [dict(result.timings_s)] * len(req.seeds)
                for k, v in result.timings_s.items():
                    timings[k] = timings.get(k, 0.0) + v
        timings["total_s"] = time.perf_counter() - t0
        return images, texts, per_sample, timings

    @staticmethod
    def _inputs(kind: str | None, inputs) -> list:
        """The task's inputs as a list: prompts (strings), images (InputImage), or [None]."""
        if kind is None:
            if inputs is not None:
                raise limits.InputError("inputs", "{inputs}: this task takes no input, got {0!r}", inputs)
            return [None]
        single = isinstance(inputs, str) if kind == "prompt" else not isinstance(inputs, (list, tuple))
        items = [inputs] if single else inputs
        if not isinstance(items, (list, tuple)) or not items:
            what = "a string or a non-empty list of strings" if kind == "prompt" else "an image or a non-empty list"
            raise limits.InputTypeError(kind, "{%s} must be %s, got {0!r}" % (kind, what), inputs)
        if kind == "prompt":
            if not all(isinstance(p, str) for p in items):
                raise limits.InputTypeError("prompt", "{prompt} must be a string or a non-empty list of strings, "
                                            "got {0!r}", inputs)
            return list(items)
        from .images import as_input
        return [as_input(x) for x in items]

    @staticmethod
    def _seeds(seed, seeds, total: int, inputs: int, n: int) -> list[int]:
        given = "seed" if seeds is None else "seeds"
        if seeds is None:
            limits.check_seeds([seed])
            seeds = [seed + i for i in range(total)]
        seeds = list(seeds)
        if len(seeds) != total:
            raise limits.InputError("seeds", "{seeds}: need one per sample ({0} input(s) x {1}), got {2}",
                                    inputs, n, len(seeds))
        limits.check_seeds(seeds, given)
        return seeds
