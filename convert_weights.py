#!/usr/bin/env python3
"""Convert the original UniDiffuser-v1 checkpoints into the model folder run.py reads.

    python convert_weights.py --src ORIGINALS --out MODEL          # from files you placed
    python convert_weights.py --download --src ORIGINALS --out MODEL
    python convert_weights.py --random tiny --out MODEL            # random weights, no downloads
"""
from __future__ import annotations

import argparse
import logging
import time
from functools import partial
from pathlib import Path

from models.config import PRESETS
from unidiffuser import cli, files, lifecycle
from unidiffuser.networks import CLIP_DIR, GPT2_DIR
from unidiffuser.weights import folders

log = logging.getLogger("unidiffuser")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", type=Path, help="folder with the original files (see --help-layout)")
    p.add_argument("--out", type=Path, help="converted model folder to write (required)")
    p.add_argument("--download", action="store_true", help="fetch the original files into --src from the hub "
                   "(never over files you placed there)")
    p.add_argument("--random", choices=sorted(PRESETS), help="first write random weights in the original "
                   "layouts (into --src if given: a new folder or one --random wrote; else a temporary "
                   "folder), then convert them")
    p.add_argument("--preset", choices=sorted(PRESETS), help="network shapes of the originals (default v1; "
                   "with --random, the --random preset)")
    p.add_argument("--dtype", choices=["fp16", "fp32", "bf16"], default="fp16", help="stored dtype (default fp16)")
    p.add_argument("--seed", type=int, help="seed of --random weights (default 0)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it is a model folder that "
                   "convert_weights.py wrote and holds nothing else (it is swapped only once the new one is complete)")
    p.add_argument("--trtllm", action="store_true", help="also write the TensorRT-LLM checkpoint folders "
                   "OUT/trtllm/{text_encoder,uvit,vae_decoder} (inputs of build_*.py, docs/engines.md)")
    p.add_argument("--help-layout", action="store_true", help="print where the original files go, and exit")
    args = p.parse_args(argv)
    if args.help_layout:
        return args
    if args.out is None:
        p.error("--out is required: the converted model folder to write, e.g. --out model")
    if args.random and args.download:
        p.error("--random and --download exclude each other: --random writes random weights, --download fetches the real ones")
    if args.random and args.preset not in (None, args.random):
        p.error(f"--preset {args.preset} contradicts --random {args.random} (the random weights have the --random shapes)")
    if args.seed is not None and not args.random:
        p.error("--seed is the seed of --random weights; without --random it would be ignored")
    if args.seed is not None and not 0 <= args.seed < 2**64:
        p.error(f"--seed must be in [0, 2**64), got {args.seed}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    src = args.src or Path("originals")
    if args.help_layout:
        print(folders.placement_help(src))
        return 0
    preset = args.random or args.preset or "v1"
    # Every check that needs no weights, before any are read or written.
    random_src = args.src if args.random else None
    if not args.random and not args.download and args.src is None:
        raise ValueError("give --src with the original files, or --download, or --random\n" + folders.placement_help(src))
    # What killed runs left where this one writes (before check_out: a model folder set aside by a
    # swap that never finished is put back first).
    lifecycle.sweep(args.out.parent)
    if random_src is not None:
        lifecycle.sweep(random_src)
        lifecycle.sweep(random_src / CLIP_DIR)
    folders.check_out(args.out, args.overwrite, None if args.random and args.src is None else src)
    if random_src is not None:
        folders.check_random_src(random_src)
    if args.download:
        folders.check_download_src(src)
    if not args.random and not args.download and not args.src.is_dir():
        raise ValueError(f"--src {args.src}: folder not found\n" + folders.placement_help(src))

    # torch, transformers: after the checks above
    from unidiffuser.weights import convert, originals, random_weights
    cfg = PRESETS[preset]
    t0 = time.perf_counter()
    # --random without --src: a marked folder in the temporary directory, removed however this ends
    scratch = files.temp_dir("random-originals") if args.random and args.src is None else None
    try:
        if args.random:
            src = args.src or scratch
            new_src = not src.exists()
            if new_src:     # half-written random originals are not left in a folder this run made
                lifecycle.own(src, folder=True)
            log.info("writing random %s weights in the original layouts to %s", preset, src)
            random_weights.write_random_originals(src, preset, args.seed or 0)
            if new_src:
                lifecycle.disown(src)
        elif args.download:
            log.info("downloading the original files into %s", src)
            originals.download_originals(src)
        missing = originals.missing_originals(src)
        if missing:
            raise folders.CheckpointError("missing original files: " + ", ".join(missing) + "\n"
                                              + folders.placement_help(src))
        originals.clip_config_matches(src, cfg)
        log.info("reading %s", src)
        networks = originals.read_originals(src, cfg)
        random = args.random is not None or (src / folders.RANDOM_MARK).is_file()
        extra = None
        if args.trtllm:
            from unidiffuser.engines import checkpoint
            # Into the new folder before it is swapped in; its files were hashed as they were written.
            extra = partial(checkpoint.write_all, verify=False)
        out = convert.write_converted(args.out, cfg, networks, args.dtype, src / CLIP_DIR, caption_tokenizer_src=src / GPT2_DIR,
                                          random=random, overwrite=args.overwrite,
                                          src=None if args.random and args.src is None else src, extra=extra)
    finally:
        if scratch is not None:
            lifecycle.remove(scratch)
    if args.trtllm:
        from unidiffuser.networks import NAMES
        log.info("wrote TensorRT-LLM checkpoints %s/trtllm/{%s}", out, ",".join(NAMES))
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"wrote {out} ({preset}, {args.dtype}, {size / 2**20:.1f} MiB{', RANDOM weights' if random else ''}) "
          f"in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    cli.run(main)
