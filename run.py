#!/usr/bin/env python3
"""Run UniDiffuser-v1: text to image (the default), or any of its other tasks.

    python run.py --prompt "an elephant under the sea" --model-dir MODEL --out out/
    python run.py --task i2t --image photo.jpg --model-dir MODEL     # a caption
    python run.py --task joint --n-samples 4 --model-dir MODEL       # images and their captions
    torchrun --nproc-per-node 2 run.py ...      # GPUs in CFG pairs (README, "Several GPUs")

Tasks: t2i (text -> image), i2t (image -> text), joint (both), i / t (an image / a text
unconditionally), i2t2i (image variation), t2i2t (text variation).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from unidiffuser import backends, cli, options, runs
from unidiffuser.tasks import TASKS

FLAGS = {"n": "--n-samples", "seeds": "--seed"}   # the library's parameter names that are not the flag's


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=TASKS, default="t2i", help="what to generate (default t2i, text to image)")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for several): t2i, t2i2t")
    p.add_argument("--prompts-file", type=Path, help="a UTF-8 text file with one prompt per line")
    p.add_argument("--image", action="append", type=Path, default=[], help="an input image (repeat for several): "
                   "i2t, i2t2i")
    p.add_argument("--images-file", type=Path, help="a UTF-8 text file with one image path per line (relative "
                   "paths from the file's folder)")
    p.add_argument("--model-dir", type=Path, required=True, help="converted model folder (convert_weights.py)")
    p.add_argument("--out", type=Path, default=Path("out"), help="output folder (default ./out)")
    p.add_argument("--overwrite", action="store_true", help="replace images (and sidecars) of the same names in --out; "
                   "without it an existing image is never replaced")
    p.add_argument("--seed", type=int, default=1234, help="seed of the first image; image i uses seed + i")
    p.add_argument("--steps", type=int, default=50, help="model evaluations of DPM-Solver++ (default 50)")
    p.add_argument("--scale", type=float, default=7.0, help="classifier-free guidance scale (default 7)")
    p.add_argument("--n-samples", type=int, default=1, help="samples per input (per run for joint, i, t), "
                   "generated as one batch")
    p.add_argument("--height", type=int, help="image height in pixels, a multiple of 16 (default: the model's, 512 for v1)")
    p.add_argument("--width", type=int, help="image width in pixels, a multiple of 16 (default: the model's)")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default cuda when available, else cpu)")
    p.add_argument("--dtype", choices=options.PRECISIONS, help="network precision (default fp16 on CUDA, fp32 on CPU; "
                   "fp8: the UViT blocks' linears in e4m3 on Hopper or newer, the rest fp16, see README)")
    p.add_argument("--backend", choices=backends.NAMES, default="torch", help="how the networks run (default torch)")
    p.add_argument("--compile", action="store_true", help="torch backend on CUDA: torch.compile the UViT "
                   "(~35 s of compiling per batch size for ~4%% per UViT call on an H100, see README)")
    p.add_argument("--engine-dir", type=Path, help="TensorRT-LLM engine folder of --backend trtllm "
                   "(default MODEL_DIR/engines, see docs/engines.md)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    planned = runs.prepare(parse_args(argv))   # every check has answered before anything is loaded
    return planned.execute()


if __name__ == "__main__":
    cli.run(main, FLAGS)
