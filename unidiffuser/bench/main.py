"""The run, in order: what runs in other processes first (cold start, each path alone), then in
this process the components, the profile, end to end and the final image's accuracy."""
from __future__ import annotations

import faulthandler
import importlib.util
import json
import logging
import sys

import torch

from models.config import PRESETS

from .. import options
from ..weights import loading
from .accuracy import component_accuracy, image_accuracy
from .cfg_parallel import cfg_parallel_main
from .chart import chart
from .cold_start import cold_start
from .components import components
from .end_to_end import end_to_end
from .child import MARK
from .isolated import isolated_main, run_all_isolated
from .nets import Paths, build_paths
from .peers import diffusers_pipeline
from .profiling import profile_uvit
from .report import partial_path, print_cold_start, print_table, print_tasks_report, save_partial, write_json
from .task_runs import run_tasks, task_child
from .timing import Clock, time_ms


def run(args) -> int:
    """Everything but --from-json (report.reprint), from checked arguments (args.parse_args)."""
    faulthandler.enable()          # a crash inside a native library still names the Python line
    logging.getLogger().setLevel(logging.WARNING)   # as before cli.run: the report is the output, not progress lines
    if args.cfg_parallel:
        return cfg_parallel_main(args)
    options.resolve(args.device)   # InputError naming --device: no CUDA here, or no such GPU
    device = torch.device(args.device)
    if args.isolated_task:
        print(MARK + json.dumps(task_child(args)), flush=True)
        return 0
    if args.tasks is not None:
        return tasks(args)
    if args.isolated:
        print(MARK + json.dumps(isolated_main(args)), flush=True)
        return 0
    # What runs in other processes goes first, while this one holds no GPU memory or context:
    # the cold start (process start -> first PNG), then each path alone.
    cold = cold_start(args, PRESETS[args.preset]) if args.cold_start or args.cold_start_only else None
    if args.cold_start_only:
        print_cold_start(cold)
        if args.json:
            write_json(args.json, {"argv": sys.argv[1:], "cold_start": cold})
        return 0
    isolated = {}
    if device.type == "cuda" and not args.no_isolated:
        have_diffusers = importlib.util.find_spec("diffusers") is not None and not args.no_diffusers
        isolated = run_all_isolated(args, have_diffusers)
    return measure(args, device, cold, isolated)


def tasks(args) -> int:
    """--tasks: each (path, task) alone (task_runs), then the table and --json."""
    if not args.device.startswith("cuda"):
        print(tasks_cpu_note(args), flush=True)
    report = run_tasks(args)
    print_tasks_report(report)
    if args.json:
        write_json(args.json, report)
        partial_path(args.json).unlink(missing_ok=True)
    return 0


def tasks_cpu_note(args) -> str:
    return (f"# CPU: a smoke test of the code paths, not a benchmark: its times mean nothing. Each (path, task) "
            f"runs in this process (on CUDA: each in a fresh process), the first call and --repeats {args.repeats} "
            f"timed calls.")


def measure(args, device: torch.device, cold: dict | None, isolated: dict) -> int:
    """The in-process part: components, accuracy, profile, end to end; the table, --json, --chart."""
    dtype, cfg, cuda = loading.DTYPES[args.dtype], PRESETS[args.preset], device.type == "cuda"
    h = w = args.size // cfg.vae_decoder.downsample
    torch.backends.cuda.matmul.allow_tf32 = False          # the fp32 reference is real fp32
    torch.backends.cudnn.allow_tf32 = False
    report = {"device": torch.cuda.get_device_name() if cuda else "cpu",
              "torch": torch.__version__, "preset": args.preset, "dtype": args.dtype, "size": args.size,
              "steps": args.steps, "argv": sys.argv[1:], "components": {}, "end_to_end": {}, "accuracy": {},
              "isolated": isolated}
    if cuda:
        report["copy_GBps"] = copy_bandwidth(device)
    print(f"# {report['device']}, torch {torch.__version__}, preset {args.preset}, {args.size}x{args.size}, "
          f"{args.steps} steps, fast path {args.dtype}", flush=True)
    if not cuda:
        print(cpu_note(args), flush=True)
    if cold is not None:
        report["cold_start"] = cold
    save_partial(args.json, report)

    paths = build_paths(cfg, args.preset, device, dtype, fp8=args.fp8 and cuda, compile=args.compile and cuda)
    outs = components(report, paths, Clock(device, args.repeats), args, cfg, h, w)
    save_partial(args.json, report)
    report["accuracy"].update(component_accuracy(outs, args.dtype))
    if args.profile and cuda:
        profiles(report, paths, cfg.uvit, h, w, device, dtype)
    end_to_end(report, paths, args, device, in_process_diffusers(args, cfg, device, dtype))
    save_partial(args.json, report)
    report["accuracy"].update(image_accuracy({"fp32": paths.ref, args.dtype: paths.fast, "fp8": paths.fp8}, args))

    print_table(report)
    if args.json:
        write_json(args.json, report)
        partial_path(args.json).unlink(missing_ok=True)
    if args.chart:
        chart(report, args.chart)
    return 0


def cpu_note(args) -> str:
    """What a CPU run (a smoke test of the code paths: its times mean nothing) leaves out or cuts."""
    skipped = ["each path in its own process", "diffusers"]
    skipped += [flag for flag, asked in (("--fp8", args.fp8), ("--compile", args.compile), ("--profile", args.profile))
                if asked]
    return (f"# CPU: a smoke test of the code paths, not a benchmark. Skipped (CUDA only): {', '.join(skipped)}. "
            f"Component timings: 1 warm-up and at most --repeats {args.repeats} calls (on CUDA: 3 and 5-30).")


def copy_bandwidth(device) -> float:
    n = 1 << 28
    a = torch.empty(n, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    return 2 * n / time_ms(lambda: b.copy_(a), device) / 1e6


def profiles(report: dict, paths: Paths, u, h: int, w: int, device, dtype) -> None:
    report["profile_uvit"] = profile_uvit(paths.fast.backend, u, h, w, device, dtype)
    print("profile: " + json.dumps(report["profile_uvit"], indent=1), flush=True)
    if paths.fp8:
        report["profile_uvit_fp8"] = profile_uvit(paths.fp8.backend, u, h, w, device, dtype)
        print("profile fp8: " + json.dumps(report["profile_uvit_fp8"], indent=1), flush=True)


def in_process_diffusers(args, cfg, device, dtype):
    """diffusers' pipeline in this process (--diffusers-in-process, CUDA), or None."""
    if not (args.diffusers_in_process and not args.no_diffusers and device.type == "cuda"):
        return None
    try:
        return diffusers_pipeline(cfg, device, dtype)
    except ImportError as e:
        print(f"diffusers not measured: {e}", flush=True)
        return None
