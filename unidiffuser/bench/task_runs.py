"""bench.py --tasks: every UniDiffuser task end to end, ours (the Python API at --dtype, random
weights of every network, no model folder) against diffusers' UniDiffuserPipeline in the same
mode, each (path, task) alone in a fresh `bench.py --isolated PATH --isolated-task TASK`
process on the GPU, one after another. A call is what the user waits for: the input file in,
the outputs on disk (task_calls). Every task runs at the first --batch-sizes, i2t and joint at
each of them. On the CPU (a smoke test whose times mean nothing) each runs in this process."""
from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from models.config import PRESETS

from ..weights import loading
from . import ROOT
from .child import run_child
from .task_calls import GUIDANCE, diffusers_call, ours_call, task_input, write_input_image
from .timing import Clock, sync

BATCHED = ("i2t", "joint")        # the tasks measured at every --batch-sizes (the others at the first)
OURS, PEER = "ours-fp16", "diffusers"   # the --isolated names of the two paths (ours runs at --dtype)
CHILD_TIMEOUT_S = 360             # one (path, task) process at most: a hung one must not take the run


def task_batches(task: str, batch_sizes: list[int]) -> list[int]:
    return list(batch_sizes) if task in BATCHED else list(batch_sizes[:1])


def repeats_of(path: str, B: int, repeats: int) -> tuple[int, int]:
    """(warm-up calls after the first, timed calls): diffusers, many times slower, at most 3 timed
    calls at B=1 and 2 beyond, after its first call."""
    if path == PEER:
        return 0, min(repeats, 3 if B == 1 else 2)
    return 1, repeats


def measure(call, device, warmup: int, repeats: int) -> dict:
    """The first call (CUDA graphs captured, kernels chosen), `warmup` more, then `repeats` timed
    calls, each between two device synchronisations: wall seconds, medians, each stage's median."""
    t = time.perf_counter()
    call()
    sync(device)
    first = time.perf_counter() - t
    for _ in range(warmup):
        call()
    times, stages = [], []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        st = call()
        sync(device)
        times.append(time.perf_counter() - t)
        stages.append(st)
    keys = dict.fromkeys(k for st in stages for k in st)
    return {"first_call_s": first, "s": statistics.median(times), "times_s": times, "repeats": repeats,
            "stages_s": {k: statistics.median(st.get(k, 0.0) for st in stages) for k in keys}}


def build(path: str, args, cfg, device, task: str, tmp: Path):
    """(B -> the call of one request of B samples, the API or None)."""
    source = task_input(task, write_input_image(tmp / "input.png", args.size))
    if path == PEER:
        from .peers import diffusers_pipeline, quiet
        quiet()
        pipe = diffusers_pipeline(cfg, device, loading.DTYPES[args.dtype], task)
        return (lambda B: diffusers_call(pipe, task, source, B, args, tmp)), None
    from .nets import random_api
    api = random_api(cfg, device, args.dtype, tmp / "model")
    return (lambda B: ours_call(api, task, source, B, args, tmp)), api


def task_child(args) -> dict:
    """One path (args.isolated) on one task (args.isolated_task) in this process, at each of
    args.batch_sizes; ours on i2t also times the caption decoder alone."""
    device, cfg, path, task = torch.device(args.device), PRESETS[args.preset], args.isolated, args.isolated_task
    cuda = device.type == "cuda"
    out = {"path": path, "task": task, "device": torch.cuda.get_device_name(device) if cuda else "cpu", "runs": {}}
    with tempfile.TemporaryDirectory(prefix=f"bench-{task}-") as tmp:
        t0 = time.perf_counter()
        call_of, api = build(path, args, cfg, device, task, Path(tmp))
        out["build_s"] = time.perf_counter() - t0
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        for B in args.batch_sizes:
            warmup, reps = repeats_of(path, B, args.repeats)
            r = out["runs"][B] = measure(call_of(B), device, warmup if cuda else 0, reps)
            r["peak_MiB"] = torch.cuda.max_memory_allocated(device) / 2**20 if cuda else None
            print(f"  [{path} {task}] B={B}: {r['s']:.3f} s (first call {r['first_call_s']:.1f} s) " +
                  ", ".join(f"{k[:-2]} {v:.3f}" for k, v in r["stages_s"].items()), file=sys.stderr, flush=True)
        if api is not None and task == "i2t":
            out["caption_decoder_ms"] = caption_decoder_alone(api, cfg, args.batch_sizes, device, args.repeats)
    return out


def caption_decoder_alone(api, cfg, batches: list[int], device, repeats: int) -> dict:
    """CaptionDecoder.generate alone (beam 5, all 67 tokens: no early stop, CUDA graph on the GPU)
    on random text latents at the API's dtype: B -> milliseconds (median), the tokens decoded and
    the longest best beam (ending at <|EOS|>, or all of them)."""
    dec = api.pipeline.backend.network("caption_decoder")
    c, out = cfg.caption_decoder, {}
    for B in batches:
        text = torch.randn(B, c.prefix_length, c.prefix_dim, generator=torch.Generator().manual_seed(B))
        text = text.to(device=device, dtype=dec.decode_prefix.weight.dtype)
        ids = dec.generate(text, check_every=0, cuda_graph=True)     # captures its graph for B
        ms = Clock(device, repeats).ms(lambda: dec.generate(text, check_every=0, cuda_graph=True), 3, 20)
        out[B] = {"ms": ms, "tokens": c.max_new_tokens, "best_beam_tokens": max(map(len, ids))}
        print(f"  [caption decoder alone] B={B}: {ms:.1f} ms", file=sys.stderr, flush=True)
    return out


def child_command(path: str, task: str, args) -> list[str]:
    return [sys.executable, str(ROOT / "bench.py"), "--isolated", path, "--isolated-task", task,
            "--device", args.device, "--preset", args.preset, "--dtype", args.dtype, "--steps", str(args.steps),
            "--size", str(args.size), "--repeats", str(args.repeats),
            "--batch-sizes", *map(str, task_batches(task, args.batch_sizes))]


def run_one(path: str, task: str, args) -> dict | None:
    """task_child in a fresh process (CUDA), or here (the CPU smoke test); B keys as ints."""
    if args.device.startswith("cuda"):
        res = run_child(child_command(path, task, args), f"{path} {task}", CHILD_TIMEOUT_S)
    else:
        child = argparse.Namespace(**{**vars(args), "isolated": path, "isolated_task": task,
                                      "batch_sizes": task_batches(task, args.batch_sizes)})
        try:
            res = json.loads(json.dumps(task_child(child)))   # as a child's JSON line reads
        except Exception as e:   # as a failed child: the other paths' numbers are kept
            print(f"{path} {task} failed: {type(e).__name__}: {e}", flush=True)
            return None
    if res is not None:
        res["runs"] = {int(B): r for B, r in res["runs"].items()}
        if "caption_decoder_ms" in res:
            res["caption_decoder_ms"] = {int(B): r for B, r in res["caption_decoder_ms"].items()}
    return res


def run_tasks(args) -> dict:
    """Each (path, task) in turn, ours then diffusers per task; the report's "tasks" part and its header."""
    from .report import save_partial
    have_peer = importlib.util.find_spec("diffusers") is not None and not args.no_diffusers
    report = {"mode": "tasks", "device": None, "torch": torch.__version__, "preset": args.preset,
              "dtype": args.dtype, "size": args.size, "steps": args.steps, "guidance": GUIDANCE,
              "argv": sys.argv[1:], "isolated": args.device.startswith("cuda"), "tasks": {}}
    for task in args.tasks:
        for path in (OURS, PEER) if have_peer else (OURS,):
            res = run_one(path, task, args)
            if res is not None:
                report["device"] = report["device"] or res["device"]
                report["tasks"].setdefault(task, {})["ours" if path == OURS else "diffusers"] = res
            save_partial(args.json, report)
    report["device"] = report["device"] or args.device
    return report
