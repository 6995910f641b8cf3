"""Each end-to-end path alone in a fresh `bench.py --isolated MODE` process, one after another
on the same GPU: only that pipeline's weights are resident and no state of another path (models,
allocator cache, compiled code) is left, so the peak memory is that path's own and the peers
run as they would standalone."""
from __future__ import annotations

import sys
import time

import torch

from models.config import PRESETS

from ..backends.torch_backend import TorchBackend
from ..pipeline import Pipeline
from ..weights import loading
from . import ROOT
from .child import run_child
from .nets import make_tokenizer, prompts, random_networks, request
from .peers import diffusers_pipeline
from .timing import sync, time_ms

def build(mode: str, args, cfg, device, dtype, tok, out: dict):
    """The path `mode`: (batch sizes it runs at, B -> the call of one batch)."""
    if mode.startswith("diffusers"):
        pipe = diffusers_pipeline(cfg, device, dtype)
        if mode == "diffusers-compiled":
            pipe.unet = torch.compile(pipe.unet)

        def call(B):
            batch = prompts(B)
            return lambda: pipe(prompt=batch, num_inference_steps=args.steps, guidance_scale=7.0,
                                height=args.size, width=args.size, output_type="pt")
        return args.batch_sizes[:1], call    # the peers are compared at the first batch size
    be = TorchBackend(random_networks(cfg, device), device, dtype, quant="fp8" if mode == "ours-fp8" else None)
    pipe = Pipeline(be, cfg, tok)
    out["weights_MiB"] = torch.cuda.memory_allocated() / 2**20

    def call(B):
        req = request(B, args)
        return lambda: pipe(req)
    return args.batch_sizes, call


def isolated_main(args) -> dict:
    """End to end for one path alone in this process. Peak memory counts what the path holds once
    built (its weights) and what it allocates running (activations, graph pools)."""
    device = torch.device("cuda")
    mode = args.isolated
    tok = make_tokenizer()
    out = {"mode": mode, "end_to_end": {}}
    t0 = time.perf_counter()
    batches, call = build(mode, args, PRESETS[args.preset], device, loading.DTYPES[args.dtype], tok, out)
    out["build_s"] = time.perf_counter() - t0
    # The path's own peak from here: its weights as it runs them, not the fp32 draw they were cast from.
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        for B in batches:
            fn = call(B)
            t1 = time.perf_counter()
            fn()                                       # capture / compile / cudnn autotuning
            sync(device)
            r = out["end_to_end"][B] = {"first_call_s": time.perf_counter() - t1}
            reps = max(2, min(3, args.repeats)) if mode.startswith("diffusers") else args.repeats
            r["ms"] = time_ms(fn, device, warmup=1, repeats=reps)
            r["img_per_s"] = 1000 * B / r["ms"]
            r["peak_MiB"] = torch.cuda.max_memory_allocated() / 2**20
            print(f"  [{mode}] B={B}: {r['ms']:.1f} ms (first call {r['first_call_s']:.1f} s), "
                  f"peak {r['peak_MiB']:.0f} MiB", file=sys.stderr, flush=True)
    return out


def run_isolated(mode: str, args) -> dict | None:
    """isolated_main in a fresh `python bench.py --isolated MODE` process; None if it failed."""
    cmd = [sys.executable, str(ROOT / "bench.py"), "--isolated", mode, "--preset", args.preset,
           "--dtype", args.dtype, "--steps", str(args.steps), "--size", str(args.size),
           "--repeats", str(args.repeats), "--batch-sizes", *map(str, args.batch_sizes)]
    res = run_child(cmd, f"isolated {mode}")
    if res is not None:
        res["end_to_end"] = {int(B): r for B, r in res["end_to_end"].items()}
    return res


def isolated_modes(args, have_diffusers: bool) -> list[str]:
    return (["ours-fp16"] + (["ours-fp8"] if args.fp8 else [])
            + (["diffusers"] if have_diffusers else [])
            + (["diffusers-compiled"] if have_diffusers and not args.no_peer_compile else []))


def run_all_isolated(args, have_diffusers: bool) -> dict:
    """Each path in its own process, one after another: mode -> its result (failures left out)."""
    isolated = {}
    for mode in isolated_modes(args, have_diffusers):
        res = run_isolated(mode, args)
        if res is not None:
            isolated[mode] = res
    return isolated
