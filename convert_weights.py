#!/usr/bin/env python3
"""Convert the original UniDiffuser-v1 checkpoints into the model folder run.py reads.

    python convert_weights.py --src ORIGINALS --out MODEL          # from files you placed
    python convert_weights.py --download --src ORIGINALS --out MODEL
    python convert_weights.py --random tiny --out MODEL            # random weights, no downloads
"""
from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

from models.config import PRESETS
from unidiffuser import checkpoints, cli

log = logging.getLogger("unidiffuser")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", type=Path, help="folder with the original files (see --help-layout)")
    p.add_argument("--out", type=Path, required=True, help="converted model folder to write")
    p.add_argument("--download", action="store_true", help="fetch the original files into --src from the hub")
    p.add_argument("--random", choices=sorted(PRESETS), help="first write random weights in the original "
                   "layouts (into --src if given, else a temporary folder), then convert them")
    p.add_argument("--preset", choices=sorted(PRESETS), default="v1", help="network shapes of the originals (default v1)")
    p.add_argument("--dtype", choices=["fp16", "fp32", "bf16"], default="fp16", help="stored dtype (default fp16)")
    p.add_argument("--seed", type=int, default=0, help="seed of --random weights")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--trtllm", action="store_true", help="also write the TensorRT-LLM checkpoint folders "
                   "OUT/trtllm/{text_encoder,uvit,vae_decoder} (inputs of build_*.py, docs/engines.md)")
    p.add_argument("--help-layout", action="store_true", help="print where the original files go, and exit")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    src = args.src or Path("originals")
    if args.help_layout:
        print(checkpoints.placement_help(src))
        return 0
    preset = args.random or args.preset
    cfg = PRESETS[preset]
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="unidiffuser-random-") as scratch:
        if args.random:
            src = args.src or Path(scratch)
            log.info("writing random %s weights in the original layouts to %s", preset, src)
            checkpoints.write_random_originals(src, preset, args.seed)
        elif args.download:
            log.info("downloading the original files into %s", src)
            checkpoints.download_originals(src)
        elif args.src is None:
            raise checkpoints.CheckpointError("give --src with the original files, or --download, or --random\n"
                                              + checkpoints.placement_help(src))
        missing = checkpoints.missing_originals(src)
        if missing:
            raise checkpoints.CheckpointError("missing original files: " + ", ".join(missing) + "\n"
                                              + checkpoints.placement_help(src))
        checkpoints.clip_config_matches(src / checkpoints.CLIP_DIR, cfg)
        log.info("reading %s", src)
        networks = checkpoints.read_originals(src, cfg)
        random = args.random is not None or (src / "RANDOM_WEIGHTS").is_file()
        out = checkpoints.write_converted(args.out, cfg, networks, args.dtype, src / checkpoints.CLIP_DIR,
                                          random=random, overwrite=args.overwrite)
    if args.trtllm:
        from unidiffuser import trtllm_checkpoint
        for name, folder in trtllm_checkpoint.write_all(out).items():
            log.info("wrote TensorRT-LLM checkpoint %s", folder)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"wrote {out} ({preset}, {args.dtype}, {size / 2**20:.1f} MiB{', RANDOM weights' if random else ''}) "
          f"in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    cli.run(main)
