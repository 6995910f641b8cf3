"""Random weights written exactly where and how the original files are laid out, so that tests
and benchmarks run the real conversion and loading without downloads (`--random tiny|v1`)."""
from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import torch
from safetensors.torch import save_file

from models import caption_decoder, image_encoder, vae_encoder
from models.config import PRESETS, ModelConfig
from models.random_weights import randomize_
from models.text_encoder import clip_text_config

from .. import caption_tokenizer, tokenizer
from ..files import atomic_write, atomic_write_text
from ..networks import AUTOENCODER_FILE, CAPTION_FILE, CLIP_DIR, CLIP_IMAGE_DIR, GPT2_DIR, UVIT_FILE, build
from .folders import RANDOM_MARK


def write_random_originals(src: Path, preset: str, seed: int = 0) -> ModelConfig:
    """Random weights written exactly where and how the original files are laid out."""
    cfg = PRESETS[preset]
    src = Path(src)
    (src / CLIP_DIR).mkdir(parents=True, exist_ok=True)
    # The mark goes first: if writing stops half-way, the folder is still known as ours.
    (src / RANDOM_MARK).write_text(f"random weights, preset {preset}, seed {seed}\n")
    g = torch.Generator().manual_seed(seed)

    atomic_write(src / UVIT_FILE, partial(torch.save, randomize_(build("uvit", cfg), g).state_dict()))

    vae = randomize_(build("vae_decoder", cfg), g).state_dict()
    vae.update(vae_encoder.random_original(cfg.vae_decoder, g))
    atomic_write(src / AUTOENCODER_FILE, partial(torch.save, vae))

    te = randomize_(build("text_encoder", cfg), g).state_dict()
    cap = {"module.encode_prefix.weight": te.pop("encode_prefix.weight"),
           "module.encode_prefix.bias": te.pop("encode_prefix.bias"),
           **caption_decoder.random_original(cfg.caption_decoder, g)}
    atomic_write(src / CAPTION_FILE, partial(torch.save, cap))
    atomic_write(src / CLIP_DIR / "model.safetensors", partial(save_file, {k: v.contiguous() for k, v in te.items()}))
    tokenizer.write_tokenizer_files(src / CLIP_DIR)

    # The image tower of the tasks that read images (the hub file is a whole CLIPModel; its
    # vision tower is all that is read) and the caption decoder's GPT-2 tokenizer.
    (src / CLIP_IMAGE_DIR).mkdir(exist_ok=True)
    vision = {k: v.contiguous() for k, v in image_encoder.random_original(cfg.image_encoder, g).items()}
    atomic_write(src / CLIP_IMAGE_DIR / "model.safetensors", partial(save_file, vision))
    caption_tokenizer.write_random_files(src / GPT2_DIR)

    from transformers import CLIPConfig
    for folder, c in ((CLIP_DIR, CLIPConfig(text_config=clip_text_config(cfg.text_encoder).to_dict())),
                      (CLIP_IMAGE_DIR, CLIPConfig(vision_config=cfg.image_encoder.clip_fields(),
                                                  projection_dim=cfg.image_encoder.projection_dim))):
        atomic_write_text(src / folder / "config.json", json.dumps(c.to_dict(), indent=2, default=str))
    return cfg


