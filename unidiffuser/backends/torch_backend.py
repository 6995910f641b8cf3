"""The PyTorch networks: fp32 as written (the reference), and on CUDA at fp16/bf16 the fast path."""
from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from models.config import ModelConfig

from ..weights.folders import require_network
from ..weights.loading import load_networks
from .graphs import capture_graph
from .warmup import warm_up_in_background

log = logging.getLogger("unidiffuser")

# Fused attention kernels in order of preference; SDPA takes the first that supports the inputs.
FAST_SDPA = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


class TorchBackend:
    """The PyTorch networks. fp32 is the reference and runs as written. fp16/bf16 on CUDA is
    the fast path: fused attention kernels at half precision, bias + GELU in the MLP's GEMM
    epilogue, the VAE decoder in channels-last (cuDNN's fastest conv layout) with the fused
    GroupNorm+SiLU kernel when `plugin/` is built, the text encoder and decoder replayed as CUDA
    graphs, the residual adds fused into the LayerNorms (Triton), the caption decoder's beam
    search graphed with its Triton kernels (models/decode_attention.py), optionally `torch.compile`,
    and `graph_safe` so the pipeline replays each model evaluation from a CUDA graph.
    quant="fp8" (fast path only) also runs the UViT blocks' linears in e4m3 (models/fp8.py)."""

    name = "torch"

    def __init__(self, nets: dict[str, torch.nn.Module], device: torch.device, dtype: torch.dtype, compile: bool = False,
                 quant: str | None = None):
        # The options were checked by the front door (options.py): quant and compile only on the fast path.
        self.device, self.dtype = device, dtype
        self.graph_safe = self.fast = self.is_fast(device, dtype)
        self.nets = {k: self._prepare(k, v) for k, v in nets.items()}
        self.text_encoder, self.uvit_net, self.vae_decoder = (self.nets.get(k) for k in ("text_encoder", "uvit",
                                                                                        "vae_decoder"))
        self.folder = None    # (model_dir, cfg, manifest) where the other tasks' networks load from
        self.quant, self.fp8_weight_stats = quant, None
        if quant == "fp8":
            from models import fp8
            self.fp8_weight_stats = fp8.convert_uvit(self.uvit_net)
        self._graphs: dict[tuple, tuple] = {}
        self._uvit = self.uvit_net
        if compile:
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
            nets = load_networks(model_dir, cfg, manifest, device, dtype)
        finally:
            if warming is not None:
                warming.join()
        backend = cls(nets, device, dtype, compile, quant)
        backend.folder = (Path(model_dir), cfg, manifest)
        return backend

    def network(self, name: str) -> torch.nn.Module:
        """A network of the tasks other than text-to-image, loaded from the model folder on first use."""
        if name not in self.nets:
            model_dir, cfg, manifest = self.folder
            require_network(model_dir, manifest, name)
            net = load_networks(model_dir, cfg, manifest, self.device, self.dtype, names=(name,))[name]
            self.nets[name] = self._prepare(name, net)
        return self.nets[name]

    def _prepare(self, name: str, net: torch.nn.Module) -> torch.nn.Module:
        """A loaded network on this device and dtype, in inference mode, with the fast path's fusions."""
        net = net.to(device=self.device, dtype=self.dtype).eval().requires_grad_(False)
        if self.fast:
            if name == "uvit":
                set_uvit_fusions(net)
            elif name in ("vae_decoder", "vae_encoder"):   # the same convs and GroupNorms
                set_decoder_fusions(net)
            elif name == "caption_decoder":
                net.fused = True     # its Triton decode attention and add + LayerNorm
        return net

    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.fast:   # ~200 small kernels: launch-bound unless replayed as a graph
            return self._replay("text_encoder", self.text_encoder, input_ids)
        return self.text_encoder(input_ids)

    def uvit(self, z, clip_img, text, t_img, t_text, data_type):
        """(z_out, clip_img_out, text_out): the noise predicted in each stream."""
        with sdpa_kernel(FAST_SDPA, set_priority=True) if self.fast else nullcontext():
            return self._uvit(z, clip_img, text, t_img, t_text, data_type)

    def encode_image(self, x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] NCHW -> the VAE latent z sampled with `noise` (scaled, fp32)."""
        vae = self.network("vae_encoder")
        if self.fast:
            x = x.contiguous(memory_format=torch.channels_last)
        return vae.sample(vae.moments(x.to(self.dtype)).float(), noise)

    def embed_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """CLIP-preprocessed images [B, 3, 224, 224] -> CLIP image embeddings [B, 512] (fp32)."""
        return self.network("image_encoder")(pixels.to(self.dtype)).float()

    def caption(self, text: torch.Tensor) -> list[list[int]]:
        """Text latents [B, 77, 64] -> each one's caption as GPT-2 token ids (beam search)."""
        return self.network("caption_decoder").generate(text.to(self.dtype), cuda_graph=self.fast)

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


def make_fast(uvit: torch.nn.Module, vae_decoder: torch.nn.Module) -> None:
    """Every fusion of the fast path on (set_uvit_fusions, set_decoder_fusions)."""
    set_uvit_fusions(uvit)
    set_decoder_fusions(vae_decoder)


def set_decoder_fusions(vae_decoder: torch.nn.Module, on: bool = True) -> None:
    """The decoder in channels-last (cuDNN picks its fastest NHWC kernels) with the fused
    GroupNorm(+SiLU) of plugin/ where it is built; off, contiguous NCHW and torch's GroupNorm."""
    from models import groupnorm
    from models.vae_decoder import GroupNorm

    vae_decoder.to(memory_format=torch.channels_last if on else torch.contiguous_format)
    fused = on and groupnorm.available()
    for m in vae_decoder.modules():
        if isinstance(m, GroupNorm):
            m.fused = fused


def set_uvit_fusions(module: torch.nn.Module, on: bool = True) -> None:
    """The UViT's fusions (fast path only), switched on or off on a whole UViT or any of its
    blocks: GEMM-epilogue GELU, residual add + LayerNorm in one Triton kernel, the skip
    concatenation as two accumulating GEMMs. Off, the modules compute as written (bench.py
    measures what each fusion gains this way)."""
    from models import fused_norm
    from models.uvit import Mlp, SkipLinear

    for m in module.modules():
        if isinstance(m, Mlp):
            m.fused_gelu = on
        elif isinstance(m, fused_norm.LayerNorm):
            m.fused = on
        elif isinstance(m, SkipLinear):
            m.split = on
