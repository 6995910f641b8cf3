#!/usr/bin/env python3
"""Build the fp16 TensorRT-LLM engine of the VAE decoder, for one image size. GroupNorm(+SiLU)
goes through the project's plugin when --plugin-lib is given (build it first, see
docs/engines.md), else through TensorRT's normalization layer.

    python build_decoder.py --model-dir MODEL --plugin-lib plugin/build/libunidiffuser_plugins.so
"""
from __future__ import annotations

from models.config import VAEDecoderConfig
from unidiffuser import cli
from unidiffuser.engines import args as build_args

NET = "vae_decoder"


def prepare(args, ckpt_config):
    from unidiffuser.engines import build as engine_build
    d = dict(ckpt_config["model_config"])
    d["ch_mult"] = tuple(d["ch_mult"])
    cfg = VAEDecoderConfig(**d)
    if args.plugin_lib is not None and not args.plugin_lib.is_file():
        raise FileNotFoundError(f"--plugin-lib {args.plugin_lib}: file not found (build it: "
                                f"cmake -S plugin -B plugin/build && cmake --build plugin/build)")
    # The default size is the UViT's trained grid times the patch size: 64x64 latents for v1.
    return cfg, engine_build.latent_size(args, ckpt_config, ckpt_config.get("default_latent", 64))


def build(args, ckpt_config, weights, prepared):
    from unidiffuser.engines import build as engine_build
    from models.trtllm.vae_decoder import VAEDecoder, load_group_norm_plugin
    cfg, latent = prepared
    use_plugin = False
    if args.plugin_lib is not None:
        use_plugin = load_group_norm_plugin(args.plugin_lib)
        if not use_plugin:
            raise SystemExit(f"error: {args.plugin_lib} loaded, but TensorRT has no UnidiffuserGroupNorm v1 creator")
    engine = engine_build.build_serialized(VAEDecoder(cfg, *latent, use_plugin=use_plugin), weights,
                                           args.max_batch_size, fused_attention=False)
    norm = {"group_norm": "UnidiffuserGroupNorm plugin" if use_plugin else "TensorRT normalization (fp32)"}
    if use_plugin:
        norm["plugin_lib"] = str(args.plugin_lib.resolve())   # the runtime may run from another folder
    return engine, args.max_batch_size, latent, norm


def main(argv=None) -> int:
    args = build_args.parse_args(NET, argv, sizes=True, plugin=True)
    from unidiffuser.engines import build as engine_build   # torch: after the arguments are checked
    return engine_build.main(NET, args, prepare, build)


if __name__ == "__main__":
    cli.run(main)
