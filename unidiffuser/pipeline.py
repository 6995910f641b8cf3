"""Every task, top to bottom: encode the input -> sample (each of the task's solver runs, one
guided UViT evaluation per step) -> decode the image and/or caption the text.

The networks come from a backend (backends/); everything around them (tokenizer, noise,
DPM-Solver++, guidance, image conversion) is shared, so backends differ only in how they run
the networks. What each task feeds the UViT is data (tasks.py), run by guidance.py.
"""
from __future__ import annotations

import logging
import os
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from models.config import ModelConfig

from . import backends, limits, parallel, sampler
from .backends.graphs import capture_graph
from .guidance import Shapes, guided, noise_inputs, split
from .options import Options
from .tasks import IMG, MODES, TASKS, TEXT, Mode
from .tokenizer import Tokenizer
from .weights.folders import CAPTION_TOKENIZER, read_manifest, require_network, verify_files, verify_small_files
from .weights.loading import DTYPES

log = logging.getLogger("unidiffuser")


@dataclass
class Request:
    prompts: list[str]              # one per sample for a task whose input is a prompt, else empty
    seeds: list[int]                # one per sample
    steps: int = 50
    scale: float = 7.0
    height: int = 512
    width: int = 512
    task: str = "t2i"
    images: list | None = None      # one RGB PIL image per sample for a task whose input is an image

    def validate(self) -> None:
        if self.task not in TASKS:
            raise limits.InputError("task", "{task} must be one of %s, got {0!r}" % ", ".join(TASKS), self.task)
        need = TASKS[self.task].input
        given = {"prompt": len(self.prompts), "image": len(self.images or ()), None: len(self.seeds)}[need]
        if given != len(self.seeds) or not self.seeds:
            raise ValueError(f"need one seed per {need or 'sample'}, and at least one")
        limits.check_side("height", self.height)
        limits.check_side("width", self.width)
        limits.check_steps(self.steps)
        limits.check_scale(self.scale)
        limits.check_seeds(self.seeds)


@dataclass
class Result:
    images: torch.Tensor | None                   # uint8 [B, H, W, 3] on the CPU, when the task makes images
    timings_s: dict[str, float] = field(default_factory=dict)
    texts: list[str] | None = None                # when the task makes texts


class Pipeline:
    def __init__(self, backend, cfg: ModelConfig, tokenizer: Tokenizer, manifest: dict | None = None,
                 cfg_pair: parallel.CfgPair | None = None):
        self.backend, self.cfg, self.tokenizer = backend, cfg, tokenizer
        self.manifest = manifest or {}
        self.cfg_pair = cfg_pair      # under torchrun: run only this rank's half of the CFG rows
        self.device, self.dtype = backend.device, backend.dtype
        self._graphs: dict[tuple, GraphedEval] = {}
        self.load_timings: dict[str, float] = {}
        self.model_dir: Path | None = None
        self._captions = None

    @property
    def captions(self):
        """The caption decoder's tokenizer (caption_tokenizer/ of the model folder), read on first use."""
        if self._captions is None:
            from .caption_tokenizer import CaptionTokenizer
            require_network(self.model_dir, self.manifest, "caption_decoder")
            verify_files(self.model_dir, self.manifest, [f"{CAPTION_TOKENIZER}/vocab.json"])
            self._captions = CaptionTokenizer(self.model_dir / CAPTION_TOKENIZER)
        return self._captions

    @classmethod
    def from_dir(cls, model_dir: Path, opts: Options, cfg_pair: parallel.CfgPair | None = None) -> "Pipeline":
        """The model folder's networks on the options' backend (options.resolve checked them)."""
        model_dir = Path(model_dir)
        t0, started = time.perf_counter(), process_age_s()
        cfg, manifest = read_manifest(model_dir)
        verify_small_files(model_dir, manifest)   # config.json, tokenizer/: before any weights
        if manifest.get("random_weights"):
            log.warning("%s holds RANDOM weights (convert_weights.py --random): images will be noise", model_dir)
        device = torch.device(opts.device)
        with on_device(device):
            net_backend = backends.load(opts.backend, model_dir, cfg, manifest, device, DTYPES[opts.dtype],
                                        **opts.backend_options())
        pipe = cls(net_backend, cfg, Tokenizer(model_dir / "tokenizer"), manifest, cfg_pair)
        pipe.model_dir = model_dir
        pipe.load_timings = {"load_s": time.perf_counter() - t0}
        if started is not None:     # what the process did before: mostly imports
            pipe.load_timings["imports_s"] = started
        log.info("loaded in %.2f s (imports %s)", pipe.load_timings["load_s"],
                 "unknown" if started is None else f"{started:.2f} s")
        return pipe

    # -- the pipeline ---------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(self, req: Request, progress: Callable[[int], None] | None = None) -> Result:
        with on_device(self.device):
            return self._generate(req, progress)

    def shapes(self, h: int, w: int) -> Shapes:
        """The streams' per-sample shapes for an h x w latent."""
        u = self.cfg.uvit
        return Shapes((u.in_chans, h, w), (1, u.clip_img_dim), (u.num_text_tokens, u.text_dim))

    def require(self, task: str) -> None:
        """Every network of `task` is in the model folder, or one line naming what to re-run: a folder
        converted before the image and caption networks existed runs text-to-image only, and the
        other tasks must say so before any work, not after sampling (t, joint need the caption
        decoder only at the end)."""
        if self.model_dir is not None:
            for name in TASKS[task].networks:
                require_network(self.model_dir, self.manifest, name)

    def _generate(self, req: Request, progress: Callable[[int], None] | None = None) -> Result:
        timings: dict[str, float] = {}
        state, x = self.latents(req, progress, timings)
        return self.decode(TASKS[req.task], state, x, req.scale, timings)

    def latents(self, req: Request, progress: Callable[[int], None] | None = None,
                timings: dict | None = None) -> tuple[dict, torch.Tensor]:
        """The task's input encoded and its solver runs done: the last run's state as {stream:
        tensors} and flat, before any decoding."""
        req.validate()
        self.require(req.task)
        task, f = TASKS[req.task], self.cfg.vae_decoder.downsample
        shapes = self.shapes(req.height // f, req.width // f)
        # Each sample's own generator, on the CPU: a seed means the same noise on every device,
        # and any sample reproduces alone.
        gens = [torch.Generator().manual_seed(s) for s in req.seeds]
        timings = {} if timings is None else timings
        with self._timed(timings, "encode_s"):
            given = self.encode(req, gens)
        with self._timed(timings, "sample_s"):   # less capture_s, when this request captured
            for i, name in enumerate(task.modes):
                mode = MODES[name]
                x, noise = self.initial_noise(mode, gens, req.steps, shapes)
                cb = None if progress is None else (lambda k, i=i: progress(i * req.steps + k))
                x = self.sample(name, x, given, noise, req, shapes, cb, timings)
                given = split(x, mode.state, shapes)    # the next run's condition
        timings["sample_s"] -= timings.get("capture_s", 0.0)
        return given, x

    def encode(self, req: Request, gens) -> dict[str, tuple[torch.Tensor, ...]]:
        """The first solver run's condition: the prompts' text latents, or the images' latents."""
        need = TASKS[req.task].input
        if need == "prompt":
            ids = self.tokenizer(req.prompts).to(self.device)
            return {TEXT: (self.backend.encode_text(ids).float(),)}
        if need == "image":    # as the original: the VAE on x / 127.5 - 1, CLIP on its own preprocessing
            from models.image_encoder import preprocess
            x = torch.stack([torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1) for img in req.images])
            x = (x.float() / 127.5 - 1).to(self.device)
            u, f = self.cfg.uvit, self.cfg.vae_decoder.downsample
            noise = torch.stack([torch.randn(u.in_chans, req.height // f, req.width // f, generator=g) for g in gens])
            z = self.backend.encode_image(x, noise.to(self.device))
            clip_img = self.backend.embed_image(preprocess(req.images).to(self.device))
            return {IMG: (z, clip_img[:, None])}
        return {}

    def initial_noise(self, mode: Mode, gens, steps: int, shapes: Shapes):
        """Per sample, from its own generator, in this order: the state's streams (z, clip_img;
        text), then every noise input of every evaluation, drawn up front as [steps, ...]. Returns
        the flat state [B, D] and {(group, stream): tensors [steps, B, ...]} on the device."""
        feeds = noise_inputs(mode)
        xs, noise = [], {key: [] for key in feeds}
        for g in gens:
            xs.append(torch.cat([torch.randn(shape, generator=g).flatten() for s in mode.state
                                 for shape in shapes.of(s)]))
            for key in feeds:
                noise[key].append([torch.randn(steps, *shape, generator=g) for shape in shapes.of(key[1])])
        x = torch.stack(xs).to(self.device)
        return x, {key: tuple(torch.stack(parts, dim=1).to(self.device) for parts in zip(*per))
                   for key, per in noise.items()}

    def sample(self, name: str, x, given, noise, req: Request, shapes: Shapes, progress=None,
               timings: dict | None = None) -> torch.Tensor:
        """One solver run of mode `name` from x. On the CUDA-graph path each model evaluation (the
        batched rows and the guidance) is replayed from a graph captured once per (mode, batch,
        size, scale): any step count reuses it, and capturing costs one evaluation. The solver's
        few vector operations between replays are launched ahead of the GPU, never waited for."""
        mode, B, N = MODES[name], x.shape[0], sampler.NUM_TRAIN_TIMESTEPS
        if getattr(self.backend, "graph_safe", False):
            key = (name, tuple(x.shape), shapes, float(req.scale))   # h x w and w x h flatten alike
            graphed = self._graphs.get(key)
            if graphed is None:
                t0 = time.perf_counter()
                graphed = self._graphs[key] = GraphedEval(self, mode, x, given, noise, shapes, req.scale)
                if timings is not None:
                    torch.cuda.synchronize()
                    timings["capture_s"] = timings.get("capture_s", 0.0) + time.perf_counter() - t0
                log.info("captured the UViT call (%s) for batch %d, %s latents, scale %g in %.2f s "
                         "(once per batch, size and scale)", name, B, "x".join(map(str, shapes.z[1:])),
                         req.scale, time.perf_counter() - t0)
            fn = graphed.noise_fn(given, noise)
        else:
            guide = guided(self.backend, mode, B, shapes, req.scale, self.cfg_pair)

            def fn(x, k, t):
                return guide(x, given, {key: tuple(v[k] for v in vs) for key, vs in noise.items()},
                             torch.full((B,), t * N, device=self.device))
        return sampler.sample(fn, x, sampler.plan(req.steps), callback=progress)

    def decode(self, task, state: dict, x: torch.Tensor, scale: float, timings: dict) -> Result:
        """The task's outputs from the last run's state: images through the VAE decoder, texts
        through the caption decoder."""
        images = texts = None
        if "image" in task.outputs:
            with self._timed(timings, "decode_s"):
                img = self.backend.decode(state[IMG][0].to(self.dtype)).float()
                check_finite(x, img, scale)
                images = to_uint8(img)
        if "text" in task.outputs:
            with self._timed(timings, "caption_s"):
                check_finite(x, x, scale)
                texts = [self.captions.decode(ids) for ids in self.backend.caption(state[TEXT][0])]
        return Result(images, timings, texts)

    @contextmanager
    def _timed(self, timings: dict, key: str):
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        sync()
        t0 = time.perf_counter()
        yield
        sync()
        timings[key] = time.perf_counter() - t0


class GraphedEval:
    """A mode's guided evaluation replayed from a CUDA graph, reading static copies of its inputs."""

    def __init__(self, pipe: Pipeline, mode: Mode, x, given, noise, shapes: Shapes, scale: float):
        # The graph also reads the tensors guided() made before capture (fixed timesteps,
        # data_type): the closure keeps them alive as long as the graph.
        B = x.shape[0]
        self.guide = guided(pipe.backend, mode, B, shapes, scale, pipe.cfg_pair)
        self.x = x.clone()
        self.given = {s: tuple(t.clone() for t in ts) for s, ts in given.items()}
        self.noise = {key: tuple(v[0].clone() for v in vs) for key, vs in noise.items()}
        self.t = torch.full((B,), 0.5 * sampler.NUM_TRAIN_TIMESTEPS, device=x.device)
        self.graph, self.out = capture_graph(lambda: self.guide(self.x, self.given, self.noise, self.t))

    def noise_fn(self, given, noise) -> sampler.NoiseFn:
        """fn(x, k, t) for one request. Its result is the graph's output buffer, overwritten by
        the next call: the solver turns it into a data prediction before calling again."""
        for s, ts in given.items():
            for static, t in zip(self.given[s], ts):
                static.copy_(t)
        N = sampler.NUM_TRAIN_TIMESTEPS

        def fn(x: torch.Tensor, k: int, t: float) -> torch.Tensor:
            self.x.copy_(x)
            for key, vs in noise.items():
                for static, v in zip(self.noise[key], vs):
                    static.copy_(v[k])
            self.t.fill_(t * N)          # the value torch.full gives the eager path
            self.graph.replay()
            return self.out

        return fn


def check_finite(x: torch.Tensor, img: torch.Tensor, scale: float) -> None:
    """Non-finite values anywhere in sampling reach the final state and the image (inf and NaN
    propagate; the clamp to [0, 255] would turn them into black or white pixels): one check at
    the end, one host sync, none per step."""
    if not bool(torch.isfinite(x).all() & torch.isfinite(img).all()):
        raise limits.InputError("scale", "sampling gave non-finite values (inf/NaN) with {scale} {0}: the "
                                "guidance overflowed; use a smaller {scale} (the original uses 7)", scale)


def on_device(device: torch.device):
    """`device` as the current CUDA device while the pipeline works on it: Triton's kernels, CUDA
    graph capture and the plugin's checks use the current device, not their tensors'; with
    `--device cuda:1` in a single process, nothing else would make it current."""
    return torch.cuda.device(device) if device.type == "cuda" else nullcontext()


def process_age_s() -> float | None:
    """Seconds since this process started (Linux /proc), or None where that is not known."""
    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None


def to_uint8(img: torch.Tensor) -> torch.Tensor:
    """[-1, 1] NCHW -> uint8 NHWC on the CPU, rounding as torchvision's save_image does."""
    img = ((img + 1) * 0.5).clamp(0, 1)
    return img.mul(255).add(0.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu()
