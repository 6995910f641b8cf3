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
import dataclasses
import logging
import re
import tempfile
from pathlib import Path

from unidiffuser import backends, cli, lifecycle, limits, memory, options
from unidiffuser.tasks import TASKS, check_backend

log = logging.getLogger("unidiffuser")
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


def read_lines(path: Path, flag: str) -> list[str]:
    try:   # utf-8-sig: a byte-order mark (Windows editors write one) is not part of the first line
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{flag} {path}: cannot read it as UTF-8 text ({getattr(e, 'strerror', None) or e})") from None
    # Lines end at \n, \r\n or \r only: str.splitlines also splits at form feeds and Unicode
    # line/paragraph separators, which inside a line are part of it.
    return [line.strip() for line in re.split(r"\r\n|\r|\n", text) if line.strip()]


def read_inputs(args) -> list:
    """The task's inputs: prompts, images (read and checked here, before any weights), or [None]."""
    need = TASKS[args.task].input
    prompts = list(args.prompt) + (read_lines(args.prompts_file, "--prompts-file") if args.prompts_file else [])
    images = list(args.image)
    if args.images_file is not None:
        images += [args.images_file.parent / p for p in read_lines(args.images_file, "--images-file")]
    if need != "prompt" and prompts:
        raise limits.InputError("prompt", "{task} {0} takes no {prompt}: it %s" % (
            "reads images (--image)" if need == "image" else "takes no input"), args.task)
    if need != "image" and images:
        raise limits.InputError("image", "{task} {0} takes no {image}: it %s" % (
            "reads prompts (--prompt)" if need == "prompt" else "takes no input"), args.task)
    if need == "prompt":
        if not prompts:
            raise ValueError("give at least one --prompt or a --prompts-file with one prompt per line")
        return prompts
    if need == "image":
        if not images:
            raise ValueError(f"--task {args.task} needs at least one --image or an --images-file")
        from unidiffuser.images import read_image
        return [read_image(p) for p in images]
    return [None]


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
    check_backend(args.task, args.backend)


def check_networks(model_dir: Path, task: str) -> None:
    """The task's networks are in the model folder (one converted before the image and caption
    networks existed has text-to-image's only), from its manifest: no torch, no weights."""
    from unidiffuser.weights.folders import read_manifest, require_network
    _, manifest = read_manifest(model_dir)
    for name in TASKS[task].networks:
        require_network(model_dir, manifest, name)


def check_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as e:
        raise ValueError(f"--out {out}: not a writable folder ({e.strerror or e})") from None


def plan_outputs(inputs: list, args) -> list[tuple[object, int, list[Path]]]:
    """Sample i: input i // n_samples, seed --seed + i, and the files it is written to."""
    from unidiffuser.files import output_stem
    suffixes = [{"image": ".png", "text": ".txt"}[o] for o in TASKS[args.task].outputs] + [".json"]
    each = [x for x in inputs for _ in range(args.n_samples)]
    plan = []
    for i, x in enumerate(each):
        stem = args.out / output_stem(args.task, x if x is None or isinstance(x, str) else {"name": x.name},
                                      args.seed + i)
        plan.append((x, args.seed + i, [stem.with_suffix(sfx) for sfx in suffixes]))
    return plan


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
    inputs = read_inputs(args)
    # Every check runs before any weights are loaded: arguments, input images, the task's networks
    # in the manifest and the output folder (before torch is imported), the engines, the device,
    # the memory a request needs (from the model folder's config and manifest), existing outputs.
    # Only the network files' hashing starts earlier, in daemon threads: an error still exits at once.
    check_arguments(args, len(inputs) * args.n_samples)
    check_networks(args.model_dir, args.task)
    check_writable(args.out)
    task = TASKS[args.task]
    lifecycle.sweep(args.out)   # temporary files of runs that were killed (SIGKILL) while writing here
    if args.backend == "torch":   # the longest part of loading needs no torch: begin it now
        from unidiffuser.networks import NETWORKS
        from unidiffuser.weights import prefetch
        prefetch.start(args.model_dir / NETWORKS[n].file for n in task.networks if n in NETWORKS)
    if args.backend == "trtllm":   # before the device check: names the missing engine's build script anywhere
        from unidiffuser.backends.engine_folder import check_engine_files
        check_engine_files(args.engine_dir or args.model_dir / "engines")
    opts = options.resolve(args.device, args.dtype, args.backend, args.compile, args.engine_dir)

    from unidiffuser import parallel
    # Under torchrun: this rank's device, CFG partner (text-to-image) and share of the samples
    # (README, "Several GPUs"); a single process gets all of them, n_samples (one input) per batch.
    layout = parallel.init_from_env(opts.device, cfg=args.scale != 0 and args.task == "t2i")
    opts = dataclasses.replace(opts, device=str(layout.device))
    budget = None
    with layout.together():   # under torchrun: if one rank refuses, every rank stops here (parallel.py)
        if args.backend == "torch":
            budget = check_memory(args.model_dir, opts.device, opts.precision, args.n_samples, args.height,
                                  args.width, args.steps)
        batches = layout.batches(plan_outputs(inputs, args), args.n_samples)
        if layout.writer and not args.overwrite:
            taken = [p for batch in batches for _, _, files in batch for p in files if p.exists()]
            if taken:
                raise ValueError(f"--out {args.out}: {taken[0].name}{f' and {len(taken) - 1} more' if len(taken) > 1 else ''} "
                                 "already exist(s); pass --overwrite to replace them, or choose another --out or --seed")

    from tqdm import tqdm

    from unidiffuser.api import UniDiffuser
    with layout.together(), memory.explained("loading the networks"):
        pipe = UniDiffuser.from_options(args.model_dir, opts, cfg_pair=layout.cfg_pair)
    for batch in batches:
        items, seeds, _ = zip(*batch)
        label = items[0] if isinstance(items[0], str) else getattr(items[0], "name", args.task)
        h, w = args.height or pipe.default_size, args.width or pipe.default_size
        with tqdm(total=args.steps * len(task.modes), desc=f"{label[:40]!r}", unit="step", leave=False,
                  disable=not layout.writer) as bar, \
                memory.explained(f"generating {len(batch)} sample(s) of {h}x{w}", budget, len(batch), h, w):
            out = pipe.generate(args.task, None if task.input is None else list(items),
                                n=len(batch) if task.input is None else 1, seeds=list(seeds), batch=len(batch),
                                steps=args.steps, scale=args.scale, height=args.height, width=args.width,
                                progress=lambda b, k: bar.update(1))
        if layout.writer:    # the first rank of a CFG pair writes the pair's outputs
            extra = {"parallel": layout.describe()} if layout.world_size > 1 else {}
            for path in out.save(args.out, overwrite=args.overwrite, extra=extra):
                print(path)
        log.info("%d sample(s) in %.2f s (%s)", len(batch), out.timings["total_s"],
                 ", ".join(f"{k[:-2]} {v:.3f}" for k, v in out.timings.items() if k != "total_s"))
    layout.close()
    return 0


if __name__ == "__main__":
    cli.run(main, FLAGS)
