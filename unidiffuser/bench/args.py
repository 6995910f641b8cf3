"""bench.py's command line (no torch: --help answers at once)."""
from __future__ import annotations

import argparse
from pathlib import Path

from models.config import PRESETS

ISOLATED = ("diffusers", "diffusers-compiled", "ours-fp16", "ours-fp8")


def parser(description: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="v1")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", choices=["fp16", "bf16"], default="fp16", help="precision of the fast path")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 4, 8],
                   help="batch sizes of our paths (the diffusers peers run at the first)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--size", type=int, default=512, help="image side in pixels")
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
    return parser(description).parse_args(argv)
