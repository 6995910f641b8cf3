"""run.py's run, from its parsed flags to the files it prints. `prepare` reads the inputs, makes
every check that needs no weights and plans the outputs (under torchrun, this rank's share);
`Run.execute` loads the networks, generates batch by batch and writes. run.py keeps the flags
(argparse) and how errors spell them (its FLAGS, cli.run).

torch is imported only after the checks that need none of it, so that they answer at once:
parallel.py, the API, tqdm and the images' code are imported inside the functions that use them."""
from __future__ import annotations

import argparse
import dataclasses
import logging
import re
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from . import lifecycle, limits, memory, options
from .tasks import TASKS, Task, check_backend

if TYPE_CHECKING:
    from .parallel import Layout

log = logging.getLogger("unidiffuser")


def read_lines(path: Path, flag: str) -> list[str]:
    try:   # utf-8-sig: a byte-order mark (Windows editors write one) is not part of the first line
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{flag} {path}: cannot read it as UTF-8 text ({getattr(e, 'strerror', None) or e})") from None
    # Lines end at \n, \r\n or \r only: str.splitlines also splits at form feeds and Unicode
    # line/paragraph separators, which inside a line are part of it.
    return [line.strip() for line in re.split(r"\r\n|\r|\n", text) if line.strip()]


def read_inputs(args: argparse.Namespace) -> list:
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
        from .images import read_image
        return [read_image(p) for p in images]
    return [None]


def check_arguments(args: argparse.Namespace, n_images: int) -> None:
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
    from .weights.folders import read_manifest, require_network
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


def plan_outputs(inputs: list, args: argparse.Namespace) -> list[tuple[object, int, list[Path]]]:
    """Sample i: input i // n_samples, seed --seed + i, and the files it is written to."""
    from .files import output_stem
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
    from .weights.folders import read_manifest
    cfg, manifest = read_manifest(model_dir)
    stored = sum(e["bytes"] for e in manifest["files"].values() if "dtype" in e)
    weights = stored * memory.DTYPE_BYTES[dtype] // memory.DTYPE_BYTES[manifest["dtype"]]   # fp8: fp16 bound
    if not device.startswith("cuda"):
        weights += stored   # the state dicts are in memory while the networks load
    budget = memory.Budget(cfg, dtype, weights, steps, device, graphs=device.startswith("cuda") and dtype != "fp32")
    budget.check(batch, height or cfg.default_size, width or cfg.default_size)
    return budget


def check_unused(batches: list, out: Path) -> None:
    """Refuse to replace any output of the run (--overwrite replaces them)."""
    taken = [p for batch in batches for _, _, files in batch for p in files if p.exists()]
    if taken:
        raise ValueError(f"--out {out}: {taken[0].name}{f' and {len(taken) - 1} more' if len(taken) > 1 else ''} "
                         "already exist(s); pass --overwrite to replace them, or choose another --out or --seed")


def prepare(args: argparse.Namespace) -> Run:
    """run.py's flags checked and planned: raises the first error, before any weights are read."""
    inputs = read_inputs(args)
    # Every check runs before any weights are loaded: arguments, input images, the task's networks
    # in the manifest and the output folder (before torch is imported), the engines, the device,
    # the memory a request needs (from the model folder's config and manifest), existing outputs.
    # Only the network files' hashing starts earlier, in daemon threads: an error still exits at once.
    check_arguments(args, len(inputs) * args.n_samples)
    check_networks(args.model_dir, args.task)
    check_writable(args.out)
    lifecycle.sweep(args.out)   # temporary files of runs that were killed (SIGKILL) while writing here
    if args.backend == "torch":   # the longest part of loading needs no torch: begin it now
        from .networks import NETWORKS
        from .weights import prefetch
        prefetch.start(args.model_dir / NETWORKS[n].file for n in TASKS[args.task].networks if n in NETWORKS)
    if args.backend == "trtllm":   # before the device check: names the missing engine's build script anywhere
        from .backends.engine_folder import check_engine_files
        check_engine_files(args.engine_dir or args.model_dir / "engines")
    opts = options.resolve(args.device, args.dtype, args.backend, args.compile, args.engine_dir)
    return place(args, inputs, opts)


def place(args: argparse.Namespace, inputs: list, opts: options.Options) -> Run:
    """This process's place (under torchrun), its memory checked and its batches planned."""
    from . import parallel
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
            check_unused(batches, args.out)
    return Run(args, opts, layout, batches, budget)


@dataclasses.dataclass
class Run:
    """A run checked and planned, no weights read yet: `execute` loads, generates and writes."""
    args: argparse.Namespace
    opts: options.Options
    layout: Layout                  # this rank's place under torchrun (a single process: all of it)
    batches: list                   # this rank's batches of (input, seed, output files)
    budget: memory.Budget | None    # what the request was checked against (torch backend)

    @property
    def task(self) -> Task:
        return TASKS[self.args.task]

    def execute(self) -> int:
        """Load the networks, then per batch: generate (a progress bar over its steps), write and
        print its files (the writer rank), log its timings. Returns the exit code."""
        from tqdm import tqdm

        from .api import UniDiffuser
        args, layout, task = self.args, self.layout, self.task
        with layout.together(), memory.explained("loading the networks"):
            pipe = UniDiffuser.from_options(args.model_dir, self.opts, cfg_pair=layout.cfg_pair)
        for batch in self.batches:
            items, seeds, _ = zip(*batch)
            label = items[0] if isinstance(items[0], str) else getattr(items[0], "name", args.task)
            h, w = args.height or pipe.default_size, args.width or pipe.default_size
            with tqdm(total=args.steps * len(task.modes), desc=f"{label[:40]!r}", unit="step", leave=False,
                      disable=not layout.writer) as bar, \
                    memory.explained(f"generating {len(batch)} sample(s) of {h}x{w}", self.budget, len(batch), h, w):
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
