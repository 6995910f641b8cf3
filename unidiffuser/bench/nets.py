"""What every measurement runs: the three networks with random weights at the preset's real
shapes (no downloads), the fast-path copies of the same weights, the tokenizer, the requests;
and for the tasks benchmark the Python API over every network, random, with no model folder."""
from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from models.caption_decoder import is_conv1d_weight

from .. import networks, tokenizer
from ..backends.torch_backend import TorchBackend
from ..caption_tokenizer import CaptionTokenizer, write_random_files
from ..pipeline import Request, Pipeline
from ..weights import random_weights
from . import PROMPT


def random_networks(cfg, device, names=networks.NAMES) -> dict[str, torch.nn.Module]:
    """The networks `names` (default text-to-image's three) with random weights
    (random_weights.randomize_; GPT-2's [in, out] matrices by their fan-in), fp32, drawn on the device."""
    g = torch.Generator(device).manual_seed(0)
    out = {}
    for n in names:
        fan_in = {"fan_in_first": is_conv1d_weight} if n == "caption_decoder" else {}
        out[n] = random_weights.randomize_(networks.build(n, cfg, device), g, **fan_in).eval().requires_grad_(False)
    return out


def random_api(cfg, device, dtype: str, folder: Path):
    """The Python API (UniDiffuser) on every network (networks.ALL) with random weights, on the
    torch backend at `dtype` ("fp16", ...), without a model folder: the caption tokenizer is the
    random stand-in vocabulary, written into `folder` (which also stands for the model folder)."""
    from ..api import UniDiffuser
    from ..weights import loading

    backend = TorchBackend(random_networks(cfg, device, networks.ALL), device, loading.DTYPES[dtype])
    pipe = Pipeline(backend, cfg, make_tokenizer(), manifest={"random_weights": True})
    write_random_files(folder / "caption_tokenizer")
    pipe._captions = CaptionTokenizer(folder / "caption_tokenizer")
    return UniDiffuser(pipe, folder, "torch", dtype)


def build_networks(cfg, device, dtype, copies=1):
    """The fp32 reference on the device and `copies` fast-path copies of the same weights."""
    ref = random_networks(cfg, device)                                      # fp32, as written
    fasts = []
    for _ in range(copies):
        fast = {k: networks.build(k, cfg, device).to(dtype=dtype).eval().requires_grad_(False) for k in ref}
        for k in ref:
            fast[k].load_state_dict(ref[k].state_dict())
        fasts.append(fast)
    return ref, *fasts


def make_tokenizer() -> tokenizer.Tokenizer:
    """CLIP's tokenizer from the files it ships (read once; the folder is gone afterwards)."""
    with tempfile.TemporaryDirectory(prefix="bench-tok-") as tmp:
        tokenizer.write_tokenizer_files(Path(tmp))
        return tokenizer.Tokenizer(Path(tmp))


def prompts(batch: int) -> list[str]:
    return [PROMPT.format(i) for i in range(batch)]


def request(batch: int, args) -> Request:
    """A benchmark batch: image i has prompt i and seed i, guidance 7, the run's steps and size."""
    return Request(prompts(batch), list(range(batch)), args.steps, 7.0, args.size, args.size)


@dataclass
class Paths:
    """The pipelines measured in this process, all on one set of random weights: the fp32
    reference, the fast path, and where asked (on CUDA) fp8 and the torch.compile'd UViT."""
    ref: Pipeline
    fast: Pipeline
    fp8: Pipeline | None = None
    compiled: Pipeline | None = None

    @property
    def tokenizer(self) -> tokenizer.Tokenizer:
        return self.fast.tokenizer


def build_paths(cfg, preset: str, device, dtype, fp8: bool, compile: bool) -> Paths:
    t0 = time.perf_counter()
    ref, fast, *fast8 = build_networks(cfg, device, dtype, copies=2 if fp8 else 1)
    print(f"built random {preset} networks in {time.perf_counter() - t0:.1f} s", flush=True)
    tok = make_tokenizer()
    paths = Paths(Pipeline(TorchBackend(ref, device, torch.float32), cfg, tok),
                  Pipeline(TorchBackend(fast, device, dtype), cfg, tok))
    if fp8:
        paths.fp8 = Pipeline(TorchBackend(fast8[0], device, dtype, quant="fp8"), cfg, tok)
    if compile:
        paths.compiled = Pipeline(TorchBackend(fast, device, dtype, compile=True), cfg, tok)
    return paths
