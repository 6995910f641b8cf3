#!/usr/bin/env python3
"""Generate images from text with UniDiffuser-v1.

    python run.py --prompt "an elephant under the sea" --model-dir MODEL --out out/
    torchrun --nproc-per-node 2 run.py ...      # GPUs in CFG pairs (README, "Several GPUs")
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import re
import tempfile
from pathlib import Path

from unidiffuser import backends, cli, lifecycle, limits, memory, options

log = logging.getLogger("unidiffuser")
FLAGS = {"n": "--n-samples", "seeds": "--seed"}   # the library's parameter names that are not the flag's


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for several)")
    p.add_argument("--prompts-file", type=Path, help="a UTF-8 text file with one prompt per line")
    p.add_argument("--model-dir", type=Path, required=True, help="converted model folder (convert_weights.py)")
    p.add_argument("--out", type=Path, default=Path("out"), help="output folder (default ./out)")
    p.add_argument("--overwrite", action="store_true", help="replace images (and sidecars) of the same names in --out; "
                   "without it an existing image is never replaced")
    p.add_argument("--seed", type=int, default=1234, help="seed of the first image; image i uses seed + i")
    p.add_argument("--steps", type=int, default=50, help="model evaluations of DPM-Solver++ (default 50)")
    p.add_argument("--scale", type=float, default=7.0, help="classifier-free guidance scale (default 7)")
    p.add_argument("--n-samples", type=int, default=1, help="images per prompt, generated as one batch")
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


def read_prompts(args) -> list[str]:
    prompts = list(args.prompt)
    if args.prompts_file is not None:
        try:   # utf-8-sig: a byte-order mark (Windows editors write one) is not part of the first prompt
            text = args.prompts_file.read_text(encoding="utf-8-sig")
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"--prompts-file {args.prompts_file}: cannot read it as UTF-8 text "
                             f"({getattr(e, 'strerror', None) or e})") from None
        # Lines end at \n, \r\n or \r only: str.splitlines also splits at form feeds and Unicode
        # line/paragraph separators, which inside a line are part of its prompt.
        prompts += [line.strip() for line in re.split(r"\r\n|\r|\n", text) if line.strip()]
    if not prompts:
        raise ValueError("give at least one --prompt or a --prompts-file with one prompt per line")
    return prompts


def check_arguments(args, n_images: int) -> None:
    """Everything about the arguments that needs neither torch nor the model folder."""
    limits.check_int("n", args.n_samples, 1, limits.MAX_BATCH)
    limits.check_steps(args.steps)
    limits.check_scale(args.scale)
    for name in ("height", "width"):
        if getattr(args, name) is not None:   # None: the model's default size
            limits.check_side(name, getattr(args, name))
    if not 0 <= args.seed <= limits.MAX_SEED - n_images:
        raise limits.InputError("seed", "{seed} must be in [0, 2**64 - {0}] (image i uses seed + i, {0} image(s)), "
                                "got {1}", n_images, args.seed)
    options.check_syntax(args.device, args.dtype, args.backend, args.compile, args.engine_dir)


def check_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as e:
        raise ValueError(f"--out {out}: not a writable folder ({e.strerror or e})") from None


def plan_outputs(prompts: list[str], args) -> list[tuple[str, int, Path]]:
    """Image i: prompt i // n_samples, seed --seed + i, and the PNG path it is written to."""
    from unidiffuser.files import image_name
    each = [p for p in prompts for _ in range(args.n_samples)]
    return [(p, args.seed + i, args.out / image_name(p, args.seed + i)) for i, p in enumerate(each)]


def check_memory(model_dir: Path, device: str, dtype: str, batch: int, height: int | None, width: int | None,
                 steps: int) -> memory.Budget:
    """Refuse a size or batch that cannot fit, from the manifest alone (no weights read); the
    budget it was checked against says what would fit if an allocation still fails."""
    from unidiffuser.weights.folders import read_manifest
    cfg, manifest = read_manifest(model_dir)
    stored = sum(e["bytes"] for e in manifest["files"].values() if "dtype" in e)
    weights = stored * memory.DTYPE_BYTES[dtype] // memory.DTYPE_BYTES[manifest["dtype"]]   # fp8: fp16 bound
    if not device.startswith("cuda"):
        weights += stored   # the state dicts are in memory while the networks load
    budget = memory.Budget(cfg, dtype, weights, steps, device, graphs=device.startswith("cuda") and dtype != "fp32")
    budget.check(batch, height or cfg.default_size, width or cfg.default_size)
    return budget


def main(argv=None) -> int:
    args = parse_args(argv)
    prompts = read_prompts(args)
    # Every check runs before any weights are loaded: arguments and the output folder (before torch
    # is imported), the engines, the device, the memory a request needs (from the model folder's
    # config and manifest), existing images. Only the network files' hashing starts earlier, in
    # daemon threads: an error still exits at once.
    check_arguments(args, len(prompts) * args.n_samples)
    check_writable(args.out)
    lifecycle.sweep(args.out)   # temporary files of runs that were killed (SIGKILL) while writing here
    if args.backend == "torch":   # the longest part of loading needs no torch: begin it now
        from unidiffuser.networks import NETWORKS
        from unidiffuser.weights import prefetch
        prefetch.start(args.model_dir / net.file for net in NETWORKS.values())
    if args.backend == "trtllm":   # before the device check: names the missing engine's build script anywhere
        from unidiffuser.backends.engine_folder import check_engine_files
        check_engine_files(args.engine_dir or args.model_dir / "engines")
    opts = options.resolve(args.device, args.dtype, args.backend, args.compile, args.engine_dir)

    from unidiffuser import parallel
    # Under torchrun: this rank's device, CFG partner and share of the images (README, "Several
    # GPUs"); a single process gets all of them, n_samples (one prompt) per batch.
    layout = parallel.init_from_env(opts.device, cfg=args.scale != 0)
    opts = dataclasses.replace(opts, device=str(layout.device))
    budget = None
    with layout.together():   # under torchrun: if one rank refuses, every rank stops here (parallel.py)
        if args.backend == "torch":
            budget = check_memory(args.model_dir, opts.device, opts.precision, args.n_samples, args.height,
                                  args.width, args.steps)
        batches = layout.batches(plan_outputs(prompts, args), args.n_samples)
        if layout.writer and not args.overwrite:
            taken = [p for batch in batches for _, _, png in batch for p in (png, png.with_suffix(".json")) if p.exists()]
            if taken:
                raise ValueError(f"--out {args.out}: {taken[0].name}{f' and {len(taken) - 1} more' if len(taken) > 1 else ''} "
                                 "already exist(s); pass --overwrite to replace them, or choose another --out or --seed")

    from tqdm import tqdm

    from unidiffuser.api import UniDiffuser
    with layout.together(), memory.explained("loading the networks"):
        pipe = UniDiffuser.from_options(args.model_dir, opts, cfg_pair=layout.cfg_pair)
    for batch in batches:
        batch_prompts, seeds, _ = zip(*batch)
        h, w = args.height or pipe.default_size, args.width or pipe.default_size
        with tqdm(total=args.steps, desc=f"{batch_prompts[0][:40]!r}", unit="step", leave=False,
                  disable=not layout.writer) as bar, \
                memory.explained(f"generating {len(batch)} image(s) of {h}x{w}", budget, len(batch), h, w):
            out = pipe(list(batch_prompts), seeds=list(seeds), batch=len(batch), steps=args.steps, scale=args.scale,
                       height=args.height, width=args.width, progress=lambda b, k: bar.update(1))
        if layout.writer:    # the first rank of a CFG pair writes the pair's images
            extra = {"parallel": layout.describe()} if layout.world_size > 1 else {}
            for png in out.save(args.out, overwrite=args.overwrite, extra=extra):
                print(png)
        t = out.timings
        log.info("%d image(s) in %.2f s (encode %.3f, sample %.3f, decode %.3f)", len(batch),
                 t["total_s"], t["encode_s"], t["sample_s"], t["decode_s"])
    layout.close()
    return 0


if __name__ == "__main__":
    cli.run(main, FLAGS)
