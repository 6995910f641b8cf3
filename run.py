#!/usr/bin/env python3
"""Generate images from text with UniDiffuser-v1.

    python run.py --prompt "an elephant under the sea" --model-dir MODEL --out out/
    torchrun --nproc-per-node 2 run.py ...     # several GPUs: CFG pairs, images spread over pairs
"""
from __future__ import annotations

import argparse
import json
import logging
import re
import tempfile
from pathlib import Path

import torch
from PIL import Image
from tqdm import tqdm

from unidiffuser import checkpoints, cli, parallel
from unidiffuser.files import atomic_write, atomic_write_text
from unidiffuser.pipeline import BACKENDS, Request, Text2Image

log = logging.getLogger("unidiffuser")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for several)")
    p.add_argument("--prompts-file", type=Path, help="a text file with one prompt per line")
    p.add_argument("--model-dir", type=Path, required=True, help="converted model folder (convert_weights.py)")
    p.add_argument("--out", type=Path, default=Path("out"), help="output folder (default ./out)")
    p.add_argument("--seed", type=int, default=1234, help="seed of the first image; image i uses seed + i")
    p.add_argument("--steps", type=int, default=50, help="model evaluations of DPM-Solver++ (default 50)")
    p.add_argument("--scale", type=float, default=7.0, help="classifier-free guidance scale (default 7)")
    p.add_argument("--n-samples", type=int, default=1, help="images per prompt, generated as one batch")
    p.add_argument("--height", type=int, help="image height in pixels, a multiple of 16 (default: the model's, 512 for v1)")
    p.add_argument("--width", type=int, help="image width in pixels, a multiple of 16 (default: the model's)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
    p.add_argument("--dtype", choices=sorted(checkpoints.DTYPES), help="network precision (default fp16 on CUDA, fp32 on CPU)")
    p.add_argument("--backend", choices=sorted(BACKENDS), default="torch", help="how the networks run (default torch)")
    p.add_argument("--compile", action="store_true", help="torch backend on CUDA: torch.compile the UViT "
                   "(~35 s of compiling per batch size for ~4%% per UViT call on an H100, see README)")
    p.add_argument("--engine-dir", type=Path, help="TensorRT-LLM engine folder of --backend trtllm "
                   "(default MODEL_DIR/engines, see docs/engines.md)")
    return p.parse_args(argv)


def read_prompts(args) -> list[str]:
    prompts = list(args.prompt)
    if args.prompts_file is not None:
        try:
            prompts += [line.strip() for line in args.prompts_file.read_text(encoding="utf-8").splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"--prompts-file {args.prompts_file}: cannot read it ({e})") from None
    if not prompts:
        raise ValueError("give at least one --prompt or a --prompts-file with one prompt per line")
    return prompts


def check_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as e:
        raise ValueError(f"--out {out}: not a writable folder ({e.strerror or e})") from None


def slug(text: str, n: int = 48) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:n].rstrip("-") or "prompt"


def main(argv=None) -> int:
    args = parse_args(argv)
    prompts = read_prompts(args)
    if args.n_samples < 1:
        raise ValueError(f"--n-samples must be >= 1, got {args.n_samples}")
    if args.backend == "trtllm":   # before the device check: names the missing engine's build script anywhere
        from unidiffuser.trtllm_backend import check_engine_files
        check_engine_files(args.engine_dir or args.model_dir / "engines")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: no CUDA device is available here (use --device cpu)")
    dtype = args.dtype or ("fp16" if args.device.startswith("cuda") else "fp32")
    # Fail on bad sizes, steps or output folder before minutes of model loading.
    probe = Request(["-"], [0], args.steps, args.scale, 16 if args.height is None else args.height,
                    16 if args.width is None else args.width)
    probe.validate()
    check_writable(args.out)
    layout = parallel.init_from_env(args.device, cfg=args.scale != 0)   # [parallel] world size 1: a no-op

    options = {"compile": True} if args.compile else {}
    if args.backend == "trtllm":
        options = {"engine_dir": args.engine_dir}     # --compile is a torch-backend option
    pipe = Text2Image.from_dir(args.model_dir, layout.device, dtype, args.backend, layout.cfg_pair, **options)
    height = pipe.cfg.default_size if args.height is None else args.height
    width = pipe.cfg.default_size if args.width is None else args.width
    random = bool(pipe.manifest.get("random_weights"))
    weights_dtype = pipe.manifest.get("dtype")
    if dtype == "fp32" and weights_dtype not in (None, "fp32"):
        log.warning("--dtype fp32 on %s weights is not the fp32 reference (they were rounded at conversion); "
                    "the reference needs a folder made by convert_weights.py --dtype fp32", weights_dtype)

    # Image i is prompt i // n_samples with seed --seed + i. [parallel] This rank's share of them,
    # n_samples at a time (world size 1: all of them, one prompt per batch).
    images = [(prompt, args.seed + i) for i, prompt in enumerate(p for p in prompts for _ in range(args.n_samples))]
    for batch in layout.batches(images, args.n_samples):
        batch_prompts, seeds = [p for p, _ in batch], [s for _, s in batch]
        req = Request(batch_prompts, seeds, args.steps, args.scale, height, width)
        with tqdm(total=args.steps, desc=f"{batch_prompts[0][:40]!r}", unit="step", leave=False,
                  disable=not layout.writer) as bar:
            result = pipe(req, progress=lambda k: bar.update(1))
        if not layout.writer:     # [parallel] the CFG partner's rank writes these images
            continue
        for img, prompt, seed in zip(result.images, batch_prompts, seeds):
            stem = args.out / f"{slug(prompt)}_seed{seed}"
            atomic_write(stem.with_suffix(".png"), lambda p: Image.fromarray(img.numpy()).save(p, format="PNG"))
            sidecar = {
                "prompt": prompt, "seed": seed, "steps": args.steps, "scale": args.scale,
                "height": height, "width": width, "batch": len(batch),
                "backend": args.backend, "dtype": dtype, "device": str(layout.device),
                "model_dir": str(args.model_dir), "random_weights": random, "weights_dtype": weights_dtype,
                "time_per_stage_s": {k: round(v, 4) for k, v in result.timings_s.items()},
            }
            if layout.world_size > 1:
                sidecar["parallel"] = layout.describe()     # [parallel]
            atomic_write_text(stem.with_suffix(".json"), json.dumps(sidecar, indent=2) + "\n")
            print(stem.with_suffix(".png"))
        t = result.timings_s
        log.info("%d image(s) in %.2f s (encode %.3f, sample %.3f, decode %.3f)", len(batch),
                 sum(t.values()), t["encode_s"], t["sample_s"], t["decode_s"])
    layout.close()
    return 0


if __name__ == "__main__":
    cli.run(main)
