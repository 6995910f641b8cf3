#!/usr/bin/env python3
"""Build the fp16 TensorRT-LLM engine of the text encoder (CLIP + encode_prefix).

    python build_clip.py --model-dir MODEL [--max-batch-size 4]
"""
from __future__ import annotations

from models.config import TextEncoderConfig
from unidiffuser import cli
from unidiffuser.engines import args as build_args

NET = "text_encoder"


def prepare(args, ckpt_config):
    return TextEncoderConfig(**ckpt_config["model_config"])


def build(args, ckpt_config, weights, cfg):
    from unidiffuser.engines import build as engine_build
    from models.trtllm.text_encoder import TextEncoder
    engine = engine_build.build_serialized(TextEncoder(cfg), weights, args.max_batch_size, fused_attention=False)
    return engine, args.max_batch_size, None, {"attention": "plain (causal)"}


def main(argv=None) -> int:
    args = build_args.parse_args(NET, argv)
    from unidiffuser.engines import build as engine_build   # torch: after the arguments are checked
    return engine_build.main(NET, args, prepare, build)


if __name__ == "__main__":
    cli.run(main)
