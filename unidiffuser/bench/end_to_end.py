"""Whole requests (tokenize -> 50 steps -> decode) in this process, per batch size: each path's
time and peak memory, and diffusers in this process where asked (for diagnosis)."""
from __future__ import annotations

import time

from .nets import Paths, prompts, request
from .timing import peak_mb, sync, time_ms


def end_to_end(report: dict, paths: Paths, args, device, diffusers=None) -> None:
    """Fills report["end_to_end"][B]; `diffusers` (a diffusers pipeline or None) runs at the first B."""
    for B in args.batch_sizes:
        req = request(B, args)
        r = report["end_to_end"][B] = {}
        for tag, pipe in e2e_paths(paths, B, args):
            reps = args.repeats if tag != "fp32" else max(1, min(2, args.repeats))
            r[f"{tag}_peak_MiB"] = peak_mb(device, lambda: pipe(req))          # also the warm-up / capture
            r[f"{tag}_ms"] = time_ms(lambda: pipe(req), device, warmup=0, repeats=reps)
            print(f"  e2e B={B} {tag}: {r[f'{tag}_ms']:.1f} ms", flush=True)
        if diffusers is not None and B == args.batch_sizes[0]:
            if not diffusers_in_process(r, diffusers, B, args, device):
                diffusers = None
        for k in [k for k in r if k.endswith("_ms")]:
            r[k.replace("_ms", "_img_per_s")] = 1000 * B / r[k]
        print(f"end-to-end B={B}: " + ", ".join(f"{k}={v:.1f}" for k, v in r.items()), flush=True)


def e2e_paths(paths: Paths, B: int, args) -> list:
    """(tag, pipeline) measured end to end at batch size B."""
    impls = [(args.dtype, paths.fast)] + ([("fp8", paths.fp8)] if paths.fp8 else [])
    impls += [("fp32", paths.ref)] if B in args.fp32_e2e_batches else []
    if paths.compiled is not None and B == args.batch_sizes[0]:
        impls.append((f"{args.dtype}_compiled", paths.compiled))
    return impls


def diffusers_in_process(r: dict, pipe, B: int, args, device) -> bool:
    """diffusers' first call and its median in this process, into r; False if it failed."""
    batch = prompts(B)

    def run():
        pipe(prompt=batch, num_inference_steps=args.steps, guidance_scale=7.0, height=args.size, width=args.size,
             output_type="pt")
    try:   # diagnosis of the in-process peer (against its isolated run)
        t1 = time.perf_counter()
        run()
        sync(device)
        r[f"diffusers_inproc_{args.dtype}_first_s"] = time.perf_counter() - t1
        r[f"diffusers_inproc_{args.dtype}_ms"] = time_ms(run, device, warmup=1, repeats=3)
        return True
    except Exception as e:   # the peer failing must not lose our own numbers
        print(f"  diffusers failed at B={B}: {type(e).__name__}: {e}", flush=True)
        return False
