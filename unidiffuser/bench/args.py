"""bench.py's command line, and every check of it that needs neither torch nor a GPU: a bad flag
is refused in one line naming it (cli.run: `error: ...`, exit 2) before anything is measured."""
from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

from models.config import PRESETS

from .. import limits, options
from ..limits import InputError
from ..tasks import TASKS

ISOLATED = ("diffusers", "diffusers-compiled", "ours-fp16", "ours-fp8")
MAX_REPEATS = 1000


def parser(description: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="v1")
    p.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (a smoke test of the code paths)")
    p.add_argument("--dtype", choices=["fp16", "bf16"], default="fp16", help="precision of the fast path")
    p.add_argument("--batch-sizes", type=int, nargs="+",
                   help="batch sizes of our paths (the diffusers peers run at the first); default 1 2 4 8, "
                   "with --tasks 1 8 (every task at the first, i2t and joint at each)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--size", type=int, help="image side in pixels, a multiple of 16 (default: the preset's, "
                   "512 for v1, 128 for tiny)")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per end-to-end measurement")
    p.add_argument("--fp32-e2e-batches", type=int, nargs="*", default=[1],
                   help="batch sizes at which the (slow) fp32 reference also runs end to end")
    p.add_argument("--no-diffusers", action="store_true", help="skip diffusers even if installed")
    p.add_argument("--no-peer-compile", action="store_true",
                   help="skip diffusers with torch.compile on its UNet (~70 s of compiling)")
    p.add_argument("--no-isolated", action="store_true", help="skip the per-path subprocess measurements")
    p.add_argument("--diffusers-in-process", action="store_true",
                   help="also time diffusers at the first batch size inside this process (diagnosis)")
    p.add_argument("--fp8", action="store_true", help="also measure the fp8 path (models/fp8.py)")
    p.add_argument("--isolated", choices=ISOLATED, help=argparse.SUPPRESS)   # internal: one path, one process
    p.add_argument("--isolated-task", choices=sorted(TASKS), help=argparse.SUPPRESS)   # internal: with --isolated
    p.add_argument("--tasks", nargs="*", metavar="TASK", help="measure only the tasks (default all seven: "
                   f"{' '.join(TASKS)}): ours end to end, input file -> outputs on disk, with its stage split, "
                   "against diffusers in the same mode, each (path, task) in its own process "
                   "(unidiffuser/bench/task_runs.py)")
    p.add_argument("--compile", action="store_true", help="also measure the torch.compile'd UViT")
    p.add_argument("--profile", action="store_true", help="split one fp16 UViT call into GEMM / attention / rest")
    p.add_argument("--json", type=Path, help="write all numbers here")
    p.add_argument("--chart", type=Path, help="write a PNG chart here (needs matplotlib)")
    p.add_argument("--from-json", type=Path, help="measure nothing: print the table of a saved --json run "
                   "(and draw its --chart)")
    p.add_argument("--cfg-parallel", action="store_true", help="under torchrun --nproc-per-node 2: end to end "
                   "on one GPU against a CFG pair of two, and the per-step exchange (unidiffuser/bench/cfg_parallel.py)")
    # cold start (unidiffuser/bench/cold_start.py)
    p.add_argument("--cold-start", action="store_true", help="also time process start -> first PNG written, "
                   "ours (run.py) and diffusers (from_pretrained), as subprocesses")
    p.add_argument("--cold-start-only", action="store_true", help="only the cold-start measurement")
    p.add_argument("--cold-start-dir", type=Path, help="work folder of the cold start (random model folders are "
                   "written here once and reused; default: a temporary folder)")
    return p


def parse_args(argv=None, description: str | None = None) -> argparse.Namespace:
    """The arguments, checked (InputError naming the parameter), --size defaulted to the preset's."""
    args = parser(description).parse_args(argv)
    check(args)
    if args.size is None:
        args.size = PRESETS[args.preset].default_size
    if args.tasks is not None:
        args.tasks = list(dict.fromkeys(args.tasks)) or list(TASKS)
    if args.batch_sizes is None:
        args.batch_sizes = [1, 8] if args.tasks is not None else [1, 2, 4, 8]
    return args


def check(args: argparse.Namespace) -> None:
    if args.from_json is not None:     # measures nothing: only what the reprint reads and writes
        check_output("chart", args.chart)
        if args.chart is not None:
            check_matplotlib()
        return
    options.check_syntax(args.device)
    if args.isolated and args.isolated_task is None and not args.device.startswith("cuda"):
        raise InputError("isolated", "{isolated} measures one path on a GPU: it needs {device} cuda")
    check_tasks(args)
    check_batch_sizes("batch_sizes", args.batch_sizes or [], distinct=True)
    check_batch_sizes("fp32_e2e_batches", args.fp32_e2e_batches)
    limits.check_steps(args.steps)
    if args.size is not None:
        limits.check_side("size", args.size)
    limits.check_int("repeats", args.repeats, 1, MAX_REPEATS)
    check_output("json", args.json)
    check_output("chart", args.chart)
    if args.chart is not None:
        check_matplotlib()
    if args.cold_start_dir is not None and args.cold_start_dir.exists() and not args.cold_start_dir.is_dir():
        raise InputError("cold_start_dir", "{cold_start_dir} {0}: not a folder", str(args.cold_start_dir))


TASK_ONLY_OFF = ("fp8", "compile", "profile", "chart", "cold_start", "cold_start_only", "cfg_parallel", "isolated")


def check_tasks(args: argparse.Namespace) -> None:
    """--tasks names tasks and measures only them; --isolated-task is a child's, with its path."""
    for task in args.tasks or ():
        if task not in TASKS:
            raise InputError("tasks", "{tasks} names %s, got {0!r}" % ", ".join(TASKS), task)
    if args.isolated_task is not None and args.isolated not in ("ours-fp16", "diffusers"):
        raise InputError("isolated_task", "{isolated_task} needs {isolated} ours-fp16 or diffusers")
    if args.tasks is not None:
        for name in TASK_ONLY_OFF:
            if getattr(args, name):
                raise InputError("tasks", "{tasks} measures the tasks only: --%s is not part of it"
                                 % name.replace("_", "-"))


def check_batch_sizes(name: str, sizes: list[int], distinct: bool = False) -> None:
    for b in sizes:
        limits.check_int(name, b, 1, limits.MAX_BATCH)
    if distinct and len(set(sizes)) != len(sizes):
        raise InputError(name, "{%s} names a batch size twice: {0}" % name, " ".join(map(str, sizes)))


def check_output(name: str, path: Path | None) -> None:
    """A file to write: its folder must exist (it is not created: a typo would scatter files)."""
    if path is None:
        return
    if path.is_dir():
        raise InputError(name, "{%s} {0}: is a folder; give a file name" % name, str(path))
    folder = path.parent
    if not folder.is_dir():
        raise InputError(name, "{%s} {0}: folder {1} does not exist (it is not created)" % name, str(path),
                         str(folder))


def check_matplotlib() -> None:
    if importlib.util.find_spec("matplotlib") is None:
        raise InputError("chart", "{chart} needs matplotlib (pip install matplotlib)")
