#!/usr/bin/env python3
"""Build the fp16 TensorRT-LLM engine of the text encoder (CLIP + encode_prefix).

    python build_clip.py --model-dir MODEL [--max-batch-size 4]
"""
from __future__ import annotations

import sys
from types import SimpleNamespace

from models.config import TextEncoderConfig
from unidiffuser import engine_build

NET = "text_encoder"


def prepare(args, ckpt_config):
    return TextEncoderConfig(**ckpt_config["model_config"])


def build(args, ckpt_config, weights, cfg):
    from models.trtllm.text_encoder import TextEncoder
    engine = engine_build.build_serialized(TextEncoder(cfg), weights, args.max_batch_size, fused_attention=False)
    return engine, args.max_batch_size, None, {"attention": "plain (causal)"}


if __name__ == "__main__":
    sys.exit(engine_build.main(NET, None, SimpleNamespace(
        parse=lambda argv: engine_build.parse_args(NET, argv), prepare=prepare, build=build)))
