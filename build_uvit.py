#!/usr/bin/env python3
"""Build the fp16 TensorRT-LLM engine of the UViT, for one image size and up to
--max-batch-size images (2x that many engine rows: the CFG batch runs as one call).

    python build_uvit.py --model-dir MODEL [--max-batch-size 4] [--height 512 --width 512]
"""
from __future__ import annotations

from models.config import UViTConfig
from unidiffuser import cli
from unidiffuser.engines import args as build_args

NET = "uvit"


def prepare(args, ckpt_config):
    from unidiffuser.engines import build as engine_build
    cfg = UViTConfig(**ckpt_config["model_config"])
    return cfg, engine_build.latent_size(args, ckpt_config, cfg.img_size)


def build(args, ckpt_config, weights, prepared):
    from unidiffuser.engines import build as engine_build
    from models.trtllm.fmha import use_fused_attention
    from models.trtllm.uvit import UViT
    cfg, latent = prepared
    fused = use_fused_attention(cfg) and not args.no_fused_attention
    rows = 2 * args.max_batch_size
    engine = engine_build.build_serialized(UViT(cfg, *latent), weights, rows, fused_attention=fused)
    plugins = {"attention": "bert_attention plugin" if fused else "plain"}
    if fused:   # as build_serialized set it: fp32 unless TensorRT-LLM rejects that on this GPU (SM 100)
        fp32 = engine_build.fmha_fp32_acc_supported(engine_build.sm_version())
        plugins["fmha_accumulation"] = "float32" if fp32 else "float16"
    return engine, rows, latent, plugins


def main(argv=None) -> int:
    args = build_args.parse_args(NET, argv, sizes=True)
    from unidiffuser.engines import build as engine_build   # torch: after the arguments are checked
    return engine_build.main(NET, args, prepare, build)


if __name__ == "__main__":
    cli.run(main)
