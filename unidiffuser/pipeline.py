"""Text-to-image, top to bottom: tokenize -> encode -> sample (50x UViT with CFG) -> decode.

The three networks come from a backend (backends/); everything around them (tokenizer, noise,
DPM-Solver++, classifier-free guidance, image conversion) is shared, so backends differ only in
how they run the networks.
"""
from __future__ import annotations

import logging
import os
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from models.config import ModelConfig

from . import backends, limits, parallel, sampler
from .tokenizer import Tokenizer
from .backends.torch_backend import capture_graph
from .options import Options
from .weights.folders import read_manifest, verify_small_files
from .weights.loading import DTYPES

log = logging.getLogger("unidiffuser")

DATA_TYPE = 1   # v1's data-type flag: 1 = the cleaner internal data it was finetuned on


@dataclass
class Request:
    prompts: list[str]
    seeds: list[int]
    steps: int = 50
    scale: float = 7.0
    height: int = 512
    width: int = 512

    def validate(self) -> None:
        if len(self.prompts) != len(self.seeds) or not self.prompts:
            raise ValueError("need one seed per prompt, and at least one prompt")
        limits.check_side("height", self.height)
        limits.check_side("width", self.width)
        limits.check_steps(self.steps)
        limits.check_scale(self.scale)
        limits.check_seeds(self.seeds)


@dataclass
class Result:
    images: torch.Tensor                          # uint8 [B, H, W, 3] on the CPU
    timings_s: dict[str, float] = field(default_factory=dict)


class Text2Image:
    def __init__(self, backend, cfg: ModelConfig, tokenizer: Tokenizer, manifest: dict | None = None,
                 cfg_pair: parallel.CfgPair | None = None):
        self.backend, self.cfg, self.tokenizer = backend, cfg, tokenizer
        self.manifest = manifest or {}
        self.cfg_pair = cfg_pair      # under torchrun: run only this rank's half of the CFG rows
        self.device, self.dtype = backend.device, backend.dtype
        self._graphs: dict[tuple, _GraphedNoise] = {}
        self.load_timings: dict[str, float] = {}

    @classmethod
    def from_dir(cls, model_dir: Path, opts: Options, cfg_pair: parallel.CfgPair | None = None) -> "Text2Image":
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
        pipe.load_timings = {"load_s": time.perf_counter() - t0}
        if started is not None:     # what the process did before: mostly imports
            pipe.load_timings["imports_s"] = started
        log.info("loaded in %.2f s (imports %s)", pipe.load_timings["load_s"],
                 "unknown" if started is None else f"{started:.2f} s")
        return pipe

    # -- the pipeline ---------------------------------------------------------------------------

    def initial_noise(self, seeds: list[int], steps: int, h: int, w: int):
        """Per image, from its own seed (so any image reproduces alone): z, clip_img, and the
        unconditional branch's text noise for every model evaluation, drawn up front. Drawn on
        the CPU so a seed means the same noise on every device."""
        u = self.cfg.uvit
        zs, clips, texts = [], [], []
        for seed in seeds:
            g = torch.Generator().manual_seed(seed)
            zs.append(torch.randn(u.in_chans, h, w, generator=g))
            clips.append(torch.randn(1, u.clip_img_dim, generator=g))
            texts.append(torch.randn(steps, u.num_text_tokens, u.text_dim, generator=g))
        return (torch.stack(zs).to(self.device), torch.stack(clips).to(self.device),
                torch.stack(texts, dim=1).to(self.device))

    def guided_noise(self, batch: int, z_shape, scale: float) -> tuple[Callable, int]:
        """The CFG noise prediction on the flat state x = [z | clip_img] that the solver moves, as
        fn(x, text, text_uncond, t_img) -> eps, and the number of UViT rows it runs.

        Conditional rows see the prompt at t_text = 0; unconditional rows ('true_uncond') see
        fresh N(0, I) text at t_text = N. Both run as one batch, or, in a CFG pair of GPUs
        (`parallel.CfgPair`), each rank runs one half and the pair exchanges the outputs, so both
        hold every row and take the same solver step. The solver state stays fp32 (as under the
        original's autocast); the network runs in the backend's dtype."""
        B, dt, N = batch, self.dtype, sampler.NUM_TRAIN_TIMESTEPS
        zdim = z_shape.numel()
        pair = self.cfg_pair if scale != 0 else None
        halves = [0] if scale == 0 else [pair.half] if pair is not None else [0, 1]    # 0: cond rows, 1: uncond rows
        rows = len(halves) * B
        t_text = torch.cat([torch.full((B,), float(h * N)) for h in halves]).to(self.device)
        data_type = torch.full((rows,), DATA_TYPE, device=self.device, dtype=torch.long)

        def fn(x: torch.Tensor, text: torch.Tensor, text_uncond: torch.Tensor, t_img: torch.Tensor) -> torch.Tensor:
            z = x[:, :zdim].reshape(B, *z_shape).repeat(len(halves), 1, 1, 1)
            clip_img = x[:, zdim:].reshape(B, 1, -1).repeat(len(halves), 1, 1)
            txt = torch.cat([text_uncond if h else text for h in halves])
            z_out, clip_out = self.backend.uvit(z.to(dt), clip_img.to(dt), txt.to(dt), t_img, t_text, data_type)
            out = torch.cat([z_out.reshape(rows, -1), clip_out.reshape(rows, -1)], dim=1)
            if pair is not None:   # all rows, cond then uncond, on both ranks of the pair
                out = pair.gather(out)
            out = out.float()
            if scale == 0:
                return out
            cond, uncond = out.chunk(2)
            return cond + scale * (cond - uncond)

        return fn, rows

    def noise_fn(self, text: torch.Tensor, text_uncond: torch.Tensor, z_shape, scale: float) -> sampler.NoiseFn:
        """guided_noise as the solver calls it: fn(x, k, t), k the model evaluation (it picks
        the unconditional text noise drawn for it), t the continuous time."""
        guided, rows = self.guided_noise(text.shape[0], z_shape, scale)
        N = sampler.NUM_TRAIN_TIMESTEPS
        return lambda x, k, t: guided(x, text, text_uncond[k], torch.full((rows,), t * N, device=self.device))

    @torch.no_grad()
    def __call__(self, req: Request, progress: Callable[[int], None] | None = None) -> Result:
        with on_device(self.device):
            return self._generate(req, progress)

    def _generate(self, req: Request, progress: Callable[[int], None] | None = None) -> Result:
        req.validate()
        f = self.cfg.vae_decoder.downsample
        h, w = req.height // f, req.width // f
        timings = {}
        with self._timed(timings, "encode_s"):
            ids = self.tokenizer(req.prompts).to(self.device)
            text = self.backend.encode_text(ids).float()
        with self._timed(timings, "sample_s"):   # less capture_s, when this request captured
            z, clip_img, text_uncond = self.initial_noise(req.seeds, req.steps, h, w)
            x = torch.cat([z.flatten(1), clip_img.flatten(1)], dim=1)
            if getattr(self.backend, "graph_safe", False):
                x = self.sample_graphed(x, text, text_uncond, z.shape[1:], req, progress, timings)
            else:
                fn = self.noise_fn(text, text_uncond, z.shape[1:], req.scale)
                x = sampler.sample(fn, x, sampler.plan(req.steps), callback=progress)
        if "capture_s" in timings:
            timings["sample_s"] -= timings["capture_s"]
        with self._timed(timings, "decode_s"):
            z = x[:, :z[0].numel()].reshape(z.shape)
            img = self.backend.decode(z.to(self.dtype)).float()
            check_finite(x, img, req.scale)
            images = to_uint8(img)
        return Result(images, timings)

    def sample_graphed(self, x, text, text_uncond, z_shape, req: Request, progress=None,
                       timings: dict | None = None) -> torch.Tensor:
        """The solver with each model evaluation (the CFG-batched UViT call and the guidance)
        replayed from a CUDA graph, captured once per (batch, size, scale): any step count reuses
        it, and capturing costs one UViT call, not fifty. The solver's few vector operations
        between replays are launched ahead of the GPU, never waited for."""
        key = graph_key(x, text, z_shape, req)
        graphed = self._graphs.get(key)
        if graphed is None:
            t0 = time.perf_counter()
            graphed = self._graphs[key] = _GraphedNoise(self, x, text, text_uncond[0], z_shape, req.scale)
            if timings is not None:
                torch.cuda.synchronize()
                timings["capture_s"] = time.perf_counter() - t0
            log.info("captured the UViT call for batch %d, %dx%d latents, scale %g in %.2f s "
                     "(once per batch, size and scale)", text.shape[0], z_shape[-2], z_shape[-1],
                     req.scale, time.perf_counter() - t0)
        return sampler.sample(graphed.noise_fn(text, text_uncond), x, sampler.plan(req.steps), callback=progress)

    @contextmanager
    def _timed(self, timings: dict, key: str):
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        sync()
        t0 = time.perf_counter()
        yield
        sync()
        timings[key] = time.perf_counter() - t0


def graph_key(x: torch.Tensor, text: torch.Tensor, z_shape, req: Request) -> tuple:
    """What a captured model evaluation is specific to: shapes and the guidance scale, never the
    prompts, seeds, noise or step count (those are copied into the graph's inputs per call)."""
    return (tuple(z_shape), tuple(x.shape), tuple(text.shape), float(req.scale))   # h x w and w x h flatten alike


class _GraphedNoise:
    """guided_noise replayed from a CUDA graph, reading static copies of its inputs."""

    def __init__(self, pipe: Text2Image, x, text, text_uncond, z_shape, scale: float):
        # The graph also reads the tensors guided_noise made before capture (t_text, data_type):
        # the closure keeps them alive as long as the graph, or replays would read freed memory.
        self.guided, rows = pipe.guided_noise(text.shape[0], z_shape, scale)
        self.x, self.text, self.text_uncond = x.clone(), text.clone(), text_uncond.clone()
        self.t_img = torch.full((rows,), 0.5 * sampler.NUM_TRAIN_TIMESTEPS, device=x.device)
        self.graph, self.out = capture_graph(lambda: self.guided(self.x, self.text, self.text_uncond, self.t_img))

    def noise_fn(self, text: torch.Tensor, text_uncond: torch.Tensor) -> sampler.NoiseFn:
        """fn(x, k, t) for one request. Its result is the graph's output buffer, overwritten by
        the next call: the solver turns it into a data prediction before calling again."""
        self.text.copy_(text)
        N = sampler.NUM_TRAIN_TIMESTEPS

        def fn(x: torch.Tensor, k: int, t: float) -> torch.Tensor:
            self.x.copy_(x)
            self.text_uncond.copy_(text_uncond[k])
            self.t_img.fill_(t * N)          # the value torch.full gives the eager path
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


