"""The arguments of build_clip.py, build_uvit.py and build_decoder.py, checked before anything
heavy is imported (torch, TensorRT-LLM): --help and argument errors answer at once."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..limits import MAX_BATCH, MAX_SIDE, check_side


def parse_args(net: str, argv=None, sizes: bool = False, plugin: bool = False):
    p = argparse.ArgumentParser(description=f"Build the fp16 TensorRT-LLM engine of the {net} network.")
    p.add_argument("--model-dir", type=Path, help="converted model folder (convert_weights.py --trtllm); gives "
                   f"the defaults MODEL/trtllm/{net} and MODEL/engines/{net}")
    p.add_argument("--checkpoint-dir", type=Path, help=f"TensorRT-LLM checkpoint folder (default MODEL/trtllm/{net})")
    p.add_argument("--output-dir", type=Path, help=f"engine folder to write (default MODEL/engines/{net})")
    p.add_argument("--max-batch-size", type=int, default=4, help="most images per call (default 4)"
                   + ("; the engine holds both CFG rows, 2x this" if net == "uvit" else ""))
    if sizes:
        p.add_argument("--height", type=int, help="image height in pixels the engine is built for, a multiple "
                       f"of 16 up to {MAX_SIDE} (default: the model's, 512 for v1)")
        p.add_argument("--width", type=int, help=f"image width in pixels, a multiple of 16 up to {MAX_SIDE} "
                       "(default: the model's)")
    if plugin:
        p.add_argument("--plugin-lib", type=Path, help="plugin/build/libunidiffuser_plugins.so: GroupNorm through "
                       "the project's plugin; without it TensorRT's own normalization is used")
    if net == "uvit":
        p.add_argument("--no-fused-attention", action="store_true", help="plain TensorRT ops instead of the "
                       "bert_attention plugin")
    args = p.parse_args(argv)
    if args.model_dir is None and (args.checkpoint_dir is None or args.output_dir is None):
        p.error("give --model-dir, or both --checkpoint-dir and --output-dir")
    args.checkpoint_dir = args.checkpoint_dir or args.model_dir / "trtllm" / net
    args.output_dir = args.output_dir or args.model_dir / "engines" / net
    if not 1 <= args.max_batch_size <= MAX_BATCH:
        p.error(f"--max-batch-size must be in 1..{MAX_BATCH}, got {args.max_batch_size}")
    for name in ("height", "width") if sizes else ():
        v = getattr(args, name)   # None is the model's default; 0 is not
        try:
            v is None or check_side(name, v)
        except ValueError as e:
            p.error(str(e))
    return args


