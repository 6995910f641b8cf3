"""Load once, generate many: the Python API.

    from unidiffuser import UniDiffuser
    pipe = UniDiffuser.load("model")                      # cuda + fp16 when there is a GPU
    out = pipe("an elephant under the sea", seed=1234, n=2)
    out.images[0].save("elephant.png")                    # PIL images; out.seeds, out.timings

Each prompt's n images run as one batch; image i, counting over all prompts, uses seed + i (or
seeds[i]), so any image reproduces alone, and the same arguments give what `run.py` writes.
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


from . import limits, options
from .files import image_name, write_outputs
from .pipeline import Pipeline, Request

log = logging.getLogger("unidiffuser")


@dataclass
class Generation:
    images: list                      # PIL.Image.Image, RGB, one per (prompt, sample)
    prompts: list[str]                # the prompt of each image
    seeds: list[int]                  # the seed of each image
    settings: dict                    # steps, scale, height, width, batch, backend, dtype, device, ...
    timings: dict[str, float] = field(default_factory=dict)   # seconds: encode/sample/decode/capture, total
    _batch_timings: list[dict] = field(default_factory=list, repr=False)   # per image: its batch's stages

    def save(self, folder: str | Path, overwrite: bool = False, extra: dict | None = None) -> list[Path]:
        """Write each image as PROMPT-SLUG_seedN.png with a JSON sidecar (prompt, seed, settings, the
        timings of its batch, the PNG's sha256, and `extra`) into folder; returns the PNG paths.
        All of them are published together, whole or not at all; an existing image is replaced
        only with overwrite=True (else FileExistsError names it and nothing is written)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        items = []
        for img, prompt, seed, t in zip(self.images, self.prompts, self.seeds, self._batch_timings):
            sidecar = {"prompt": prompt, "seed": seed, **self.settings, **(extra or {}),
                       "time_per_stage_s": {k: round(v, 4) for k, v in t.items()}}
            items.append((folder / image_name(prompt, seed), lambda p, img=img: img.save(p, format="PNG"), sidecar))
        write_outputs(items, overwrite)
        paths = [png for png, _, _ in items]
        return paths


class UniDiffuser:
    """A converted model folder loaded once (see `load`); call it with prompts to get images."""

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
        MODEL_DIR/engines); cfg_pair: this rank's half of a CFG pair under torchrun
        (`parallel.init_from_env(...).cfg_pair`). A bad option or model folder raises ValueError
        with one clear line naming it, before any weights are read."""
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

    def __call__(self, prompt: str | Sequence[str], seed: int = 1234, n: int = 1, steps: int = 50, scale: float = 7.0,
                 height: int | None = None, width: int | None = None, seeds: Sequence[int] | None = None,
                 batch: int | None = None, progress: Callable[[int, int], None] | None = None) -> Generation:
        """Images for one prompt or a list of prompts, n per prompt.

        seeds: one per image (len(prompts) * n), instead of seed, seed + 1, ...; batch: images per
        batch (default n: one batch per prompt; a batch may mix prompts); progress(batch, step) is
        called after each sampling step of each batch (on the CUDA-graph path, when the step is
        queued on the GPU: the bar runs ahead of the GPU and the last step waits for it)."""
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if not isinstance(prompts, (list, tuple)) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise limits.InputTypeError("prompt", "{prompt} must be a string or a non-empty list of strings, got {0!r}",
                                        prompt)
        prompts = list(prompts)
        limits.check_int("n", n, 1, limits.MAX_BATCH)
        total = len(prompts) * n
        given = "seed" if seeds is None else "seeds"
        if seeds is None:
            limits.check_seeds([seed])
            seeds = [seed + i for i in range(total)]
        seeds = list(seeds)
        if len(seeds) != total:
            raise limits.InputError("seeds", "{seeds}: need one per image ({0} prompt(s) x {1}), got {2}",
                                    len(prompts), n, len(seeds))
        limits.check_seeds(seeds, given)
        batch = n if batch is None else batch
        limits.check_int("batch", batch, 1, limits.MAX_BATCH)
        height = self.default_size if height is None else height
        width = self.default_size if width is None else width
        each = [p for p in prompts for _ in range(n)]
        batches = [Request(each[i:i + batch], seeds[i:i + batch], steps, scale, height, width)
                   for i in range(0, total, batch)]
        for req in batches:        # bad settings or seeds fail before any work
            req.validate()

        from PIL import Image

        images, per_image, timings = [], [], {}
        t0 = time.perf_counter()
        with self._lock:
            for b, req in enumerate(batches):
                cb = None if progress is None else (lambda k, b=b: progress(b, k))
                result = self.pipeline(req, progress=cb)
                images += [Image.fromarray(img.numpy()) for img in result.images]
                per_image += [dict(result.timings_s)] * len(req.prompts)
                for k, v in result.timings_s.items():
                    timings[k] = timings.get(k, 0.0) + v
        timings["total_s"] = time.perf_counter() - t0
        p = self.pipeline
        settings = {"steps": steps, "scale": scale, "height": height, "width": width, "batch": batch,
                    "backend": self.backend, "dtype": self.precision, "device": str(p.device),
                    "model_dir": str(self.model_dir), "random_weights": self.random_weights,
                    "weights_dtype": self.weights_dtype}
        return Generation(images, each, seeds, settings, timings, per_image)
