"""Random weights written exactly where and how the original files are laid out, so that tests
and benchmarks run the real conversion and loading without downloads (`--random tiny|v1`)."""
from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from models.config import PRESETS, ModelConfig
from models.text_encoder import clip_text_config

from .. import tokenizer
from ..files import atomic_write, atomic_write_text
from ..networks import AUTOENCODER_FILE, CAPTION_FILE, CLIP_DIR, UVIT_FILE, build
from .folders import RANDOM_MARK


def randomize_(module: nn.Module, generator: torch.Generator) -> nn.Module:
    """Deterministic random weights with healthy activations: matrices ~ N(0, 1/fan_in), norm
    scales ~ 1 + N(0, 0.1), biases and norm shifts ~ N(0, 0.1), position tables ~ N(0, 0.02).
    Drawn on the generator's device (a CUDA generator fills v1 in well under a second)."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=generator, device=generator.device)
            if p.ndim == 1:
                is_scale = name.endswith("weight")
                p.copy_(1 + 0.1 * noise if is_scale else 0.1 * noise)
            elif p.shape[0] == 1:
                p.copy_(0.02 * noise)
            else:
                p.copy_(noise / (p[0].numel() ** 0.5))
    return module


def _encoder_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the autoencoder's encoder half (present in autoencoder_kl.pth)."""
    v = cfg.vae_decoder
    shapes: dict[str, tuple[int, ...]] = {}

    def conv(name, cin, cout, k):
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (cout, cin, k, k), (cout,)

    def norm(name, c):
        shapes[f"{name}.weight"] = shapes[f"{name}.bias"] = (c,)

    def resnet(name, cin, cout):
        norm(f"{name}.norm1", cin), conv(f"{name}.conv1", cin, cout, 3)
        norm(f"{name}.norm2", cout), conv(f"{name}.conv2", cout, cout, 3)
        if cin != cout:
            conv(f"{name}.nin_shortcut", cin, cout, 1)

    conv("encoder.conv_in", v.out_ch, v.ch, 3)
    cin = v.ch
    for i, m in enumerate(v.ch_mult):
        for j in range(v.num_res_blocks):
            resnet(f"encoder.down.{i}.block.{j}", cin, v.ch * m)
            cin = v.ch * m
        if i != len(v.ch_mult) - 1:
            conv(f"encoder.down.{i}.downsample.conv", cin, cin, 3)
    resnet("encoder.mid.block_1", cin, cin)
    norm("encoder.mid.attn_1.norm", cin)
    for n in ("q", "k", "v", "proj_out"):
        conv(f"encoder.mid.attn_1.{n}", cin, cin, 1)
    resnet("encoder.mid.block_2", cin, cin)
    norm("encoder.norm_out", cin)
    conv("encoder.conv_out", cin, 2 * v.z_channels, 3)
    conv("quant_conv", 2 * v.z_channels, 2 * v.embed_dim, 1)
    return shapes


def write_random_originals(src: Path, preset: str, seed: int = 0) -> ModelConfig:
    """Random weights written exactly where and how the original files are laid out."""
    from transformers import CLIPConfig

    cfg = PRESETS[preset]
    src = Path(src)
    (src / CLIP_DIR).mkdir(parents=True, exist_ok=True)
    # The mark goes first: if writing stops half-way, the folder is still known as ours.
    (src / RANDOM_MARK).write_text(f"random weights, preset {preset}, seed {seed}\n")
    g = torch.Generator().manual_seed(seed)

    atomic_write(src / UVIT_FILE, partial(torch.save, randomize_(build("uvit", cfg), g).state_dict()))

    vae = randomize_(build("vae_decoder", cfg), g).state_dict()
    for k, shape in _encoder_shapes(cfg).items():
        vae[k] = torch.randn(shape, generator=g) * 0.05
    atomic_write(src / AUTOENCODER_FILE, partial(torch.save, vae))

    te = randomize_(build("text_encoder", cfg), g).state_dict()
    # The real caption decoder also holds a GPT-2 (module.gpt.*), not needed for text-to-image.
    d = cfg.text_encoder
    cap = {"module.encode_prefix.weight": te.pop("encode_prefix.weight"),
           "module.encode_prefix.bias": te.pop("encode_prefix.bias"),
           "module.decode_prefix.weight": torch.randn(d.hidden_size, d.prefix_dim, generator=g) * 0.1,
           "module.decode_prefix.bias": torch.zeros(d.hidden_size)}
    atomic_write(src / CAPTION_FILE, partial(torch.save, cap))
    atomic_write(src / CLIP_DIR / "model.safetensors", partial(save_file, {k: v.contiguous() for k, v in te.items()}))
    clip_cfg = CLIPConfig(text_config=clip_text_config(d).to_dict()).to_dict()
    atomic_write_text(src / CLIP_DIR / "config.json", json.dumps(clip_cfg, indent=2, default=str))
    tokenizer.write_tokenizer_files(src / CLIP_DIR)
    return cfg


