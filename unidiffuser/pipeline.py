"""Text-to-image, top to bottom: tokenize -> encode -> sample (50x UViT with CFG) -> decode.

The three networks come from a backend (`BACKENDS`); everything around them (tokenizer,
noise, DPM-Solver++, classifier-free guidance, image conversion) is shared, so backends differ
only in how they run the networks.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from models.config import ModelConfig

from . import checkpoints, limits, parallel, sampler
from .tokenizer import Tokenizer

log = logging.getLogger("unidiffuser")

DATA_TYPE = 1   # v1's data-type flag: 1 = the cleaner internal data it was finetuned on


# Fused attention kernels in order of preference; SDPA takes the first that supports the inputs.
FAST_SDPA = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


class TorchBackend:
    """The PyTorch networks. fp32 is the reference and runs as written. fp16/bf16 on CUDA is
    the fast path: fused attention kernels at half precision, bias + GELU in the MLP's GEMM
    epilogue, the VAE decoder in channels-last (cuDNN's fastest conv layout) with the fused
    GroupNorm+SiLU kernel when `plugin/` is built, the text encoder and decoder replayed as CUDA
    graphs, the residual adds fused into the LayerNorms (Triton), optionally `torch.compile`,
    and `graph_safe` so the pipeline replays each model evaluation from a CUDA graph.
    quant="fp8" (fast path only) also runs the UViT blocks' linears in e4m3 (models/fp8.py)."""

    name = "torch"

    def __init__(self, nets: dict[str, torch.nn.Module], device: torch.device, dtype: torch.dtype, compile: bool = False,
                 quant: str | None = None):
        if quant not in (None, "fp8"):
            raise ValueError(f"quant must be None or 'fp8', got {quant!r}")
        self.device, self.dtype = device, dtype
        self.graph_safe = self.fast = self.is_fast(device, dtype)
        if quant and not self.fast:
            raise ValueError("fp8 needs the CUDA fast path (--device cuda, fp16 or bf16 networks)")
        nets = {k: v.to(device=device, dtype=dtype).eval().requires_grad_(False) for k, v in nets.items()}
        self.text_encoder, self.uvit_net, self.vae_decoder = nets["text_encoder"], nets["uvit"], nets["vae_decoder"]
        if self.fast:
            make_fast(self.uvit_net, self.vae_decoder)
        self.quant, self.fp8_weight_stats = quant, None
        if quant == "fp8":
            from models import fp8
            self.fp8_weight_stats = fp8.convert_uvit(self.uvit_net)
        self._graphs: dict[tuple, tuple] = {}
        self._uvit = self.uvit_net
        if compile:
            if device.type != "cuda":
                raise ValueError("--compile needs --device cuda")
            # Default inductor mode (no cudagraphs of its own: the pipeline captures the UViT call).
            self._uvit = torch.compile(self.uvit_net, dynamic=False)

    @staticmethod
    def is_fast(device: torch.device, dtype: torch.dtype) -> bool:
        return device.type == "cuda" and dtype != torch.float32

    @classmethod
    def load(cls, model_dir: Path, cfg: ModelConfig, manifest: dict, device: torch.device, dtype: torch.dtype,
             compile: bool = False, quant: str | None = None) -> "TorchBackend":
        warming = warm_up_in_background(cfg, device, dtype) if cls.is_fast(device, dtype) else None
        try:
            nets = checkpoints.load_networks(model_dir, cfg, manifest, device, dtype)
        finally:
            if warming is not None:
                warming.join()
        return cls(nets, device, dtype, compile, quant)

    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.fast:   # ~200 small kernels: launch-bound unless replayed as a graph
            return self._replay("text_encoder", self.text_encoder, input_ids)
        return self.text_encoder(input_ids)

    def uvit(self, z, clip_img, text, t_img, t_text, data_type):
        with sdpa_kernel(FAST_SDPA, set_priority=True) if self.fast else nullcontext():
            z_out, clip_img_out, _ = self._uvit(z, clip_img, text, t_img, t_text, data_type)
        return z_out, clip_img_out

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        # No cuDNN autotuning (cudnn.benchmark): on an H200 a fresh process's first decode took
        # 1.14 s with it and 0.36 s without, and it bought nothing (graphed decoder 7.64 ms with
        # it, 7.62 without: cuDNN's heuristics already pick its NHWC kernels).
        if self.fast:
            return self._replay("vae_decoder", self.vae_decoder, z.contiguous(memory_format=torch.channels_last))
        return self.vae_decoder(z)

    def _replay(self, name: str, fn, x: torch.Tensor) -> torch.Tensor:
        """fn(x) as a CUDA graph, captured on the first call for each input shape."""
        key = (name, x.shape, x.dtype)
        if key not in self._graphs:
            static = x.clone()
            t0 = time.perf_counter()
            try:
                self._graphs[key] = (static, *capture_graph(lambda: fn(static)))
            except RuntimeError as e:   # a network that syncs with the host cannot be captured
                log.warning("%s runs eagerly: CUDA graph capture failed (%s)", name, e)
                self._graphs[key] = None
            torch.cuda.synchronize()
            log.info("captured the %s for input %s in %.2f s (once per shape)", name.replace("_", " "),
                     "x".join(map(str, x.shape)), time.perf_counter() - t0)
        if self._graphs[key] is None:
            return fn(x)
        static, graph, out = self._graphs[key]
        static.copy_(x)
        graph.replay()
        return out.clone()


def capture_graph(fn: Callable[[], torch.Tensor]) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    """Run fn once on a side stream, so that handles, autotuning and compilation happen outside
    the capture, then capture fn. Replaying the graph recomputes the returned tensor from fn's
    current inputs."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def make_fast(uvit: torch.nn.Module, vae_decoder: torch.nn.Module) -> None:
    """In the UViT: GEMM-epilogue GELU, residual add + LayerNorm in one Triton kernel, the
    skip concatenation as two accumulating GEMMs. In the decoder: channels-last convs (cuDNN
    picks its fastest NHWC kernels) and the fused GroupNorm."""
    from models import groupnorm
    from models.vae_decoder import GroupNorm

    make_uvit_fast(uvit)
    vae_decoder.to(memory_format=torch.channels_last)
    fused = groupnorm.available()
    for m in vae_decoder.modules():
        if isinstance(m, GroupNorm):
            m.fused = fused


def make_uvit_fast(module: torch.nn.Module) -> None:
    """The UViT's fusions, on a whole UViT or any of its blocks."""
    from models import fused_norm
    from models.uvit import Mlp, SkipLinear

    for m in module.modules():
        if isinstance(m, Mlp):
            m.fused_gelu = True
        elif isinstance(m, fused_norm.LayerNorm):
            m.fused = True
        elif isinstance(m, SkipLinear):
            m.split = True


def warm_up_in_background(cfg: ModelConfig, device: torch.device, dtype: torch.dtype) -> threading.Thread:
    """A thread that runs one UViT out-block (at the default size's sequence length), the patch
    convolution, a decoder-sized convolution and the fused GroupNorm on throwaway weights, so that
    what a process pays on the first use of each (loading the cuDNN and cuBLAS libraries and
    kernels, Triton's cached kernel and its launcher, the plugin library: about a second on an
    H200) overlaps the loading of the weights instead of delaying the first image. (cuDNN keeps
    its attention plans per thread: the pipeline's thread still builds its own.) Nothing it makes
    is kept; a failure only loses the head start (logged at debug level). Like every UViT call, it
    sets SDPA's process-wide backend priority while it runs."""
    # A new thread starts on GPU 0 whatever the caller chose (torchrun ranks set theirs), and
    # Triton launches on the current device: give the thread the caller's.
    index = None
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()

    def work():
        try:
            if index is not None:
                torch.cuda.set_device(index)
            from models import groupnorm
            from models.uvit import Block, PatchEmbed

            u, v = cfg.uvit, cfg.vae_decoder
            side = cfg.default_size // v.downsample
            with torch.no_grad(), torch.device(device):
                block = Block(u, skip=True).to(dtype)
                make_uvit_fast(block)
                x = torch.randn(2, u.sequence_length(side, side), u.embed_dim, dtype=dtype)
                with sdpa_kernel(FAST_SDPA, set_priority=True):
                    block(x, x)
                PatchEmbed(u).to(dtype)(torch.randn(2, u.in_chans, side, side, dtype=dtype))
                c = v.ch * v.ch_mult[-1]
                h = torch.randn(1, c, side, side, dtype=dtype).contiguous(memory_format=torch.channels_last)
                conv = torch.nn.Conv2d(c, c, 3, padding=1).to(dtype=dtype, memory_format=torch.channels_last)
                conv(h)
                if device.type == "cuda" and groupnorm.available():
                    groupnorm.group_norm(h, torch.ones(c, dtype=dtype), torch.zeros(c, dtype=dtype), v.num_groups,
                                         1e-6, True)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
        except Exception as e:   # noqa: BLE001 - a head start, never a reason to fail
            log.debug("warm-up thread: %s: %s", type(e).__name__, e)

    thread = threading.Thread(target=work, name="warm-up", daemon=True)
    thread.start()
    return thread


def _trtllm_backend(*args, **kwargs):
    from .trtllm_backend import TrtllmBackend   # imports tensorrt_llm: only when asked for
    return TrtllmBackend(*args, **kwargs)


BACKENDS: dict[str, Callable] = {"torch": TorchBackend.load, "trtllm": _trtllm_backend}


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
        bad = [s for s in self.seeds if not isinstance(s, int) or not 0 <= s < 2**64]
        if bad:   # torch.Generator.manual_seed takes [0, 2**64)
            raise ValueError(f"--seed: every image's seed must be an integer in [0, 2**64), got {bad[0]}")


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
    def from_dir(cls, model_dir: Path, device: str | torch.device, dtype: str = "fp32", backend: str = "torch",
                 cfg_pair: parallel.CfgPair | None = None, **backend_options):
        if backend not in BACKENDS:
            raise ValueError(f"--backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        if dtype not in checkpoints.DTYPES:
            raise ValueError(f"--dtype must be one of {', '.join(checkpoints.DTYPES)}, got {dtype!r}")
        model_dir = Path(model_dir)
        t0, started = time.perf_counter(), process_age_s()
        cfg, manifest = checkpoints.read_manifest(model_dir)
        checkpoints.verify_small_files(model_dir, manifest)   # config.json, tokenizer/: before any weights
        if manifest.get("random_weights"):
            log.warning("%s holds RANDOM weights (convert_weights.py --random): images will be noise", model_dir)
        with on_device(torch.device(device)):
            net_backend = BACKENDS[backend](model_dir, cfg, manifest, torch.device(device), checkpoints.DTYPES[dtype],
                                            **backend_options)
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
