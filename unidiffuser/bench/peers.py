"""diffusers' UniDiffuserPipeline at our shapes with random weights: the peer we are compared to."""
from __future__ import annotations

import tempfile
from pathlib import Path

from .. import tokenizer


def clip_tokenizer(cls):
    """transformers' CLIPTokenizer (diffusers' pipeline wants one) on CLIP's BPE files."""
    with tempfile.TemporaryDirectory(prefix="bench-tok-") as tmp:
        tokenizer.write_tokenizer_files(Path(tmp))
        return cls.from_pretrained(tmp, model_max_length=77)


def unet(u):
    """diffusers' UniDiffuserModel with the UViT's shapes (UViTConfig u)."""
    from diffusers.pipelines.deprecated.unidiffuser import UniDiffuserModel
    return UniDiffuserModel(
        text_dim=u.text_dim, clip_img_dim=u.clip_img_dim, num_text_tokens=u.num_text_tokens,
        num_attention_heads=u.num_heads, attention_head_dim=u.embed_dim // u.num_heads,
        in_channels=u.in_chans, out_channels=u.in_chans, num_layers=u.depth, norm_num_groups=32,
        attention_bias=u.qkv_bias, sample_size=u.img_size, patch_size=u.patch_size, activation_fn="gelu",
        num_embeds_ada_norm=1000, block_type="unidiffuser", pre_layer_norm=False,
        use_timestep_embedding=False, use_patch_pos_embed=False, ff_final_dropout=True,
        use_data_type_embedding=True)


def vae(v, sample_size: int):
    """diffusers' AutoencoderKL with the decoder's shapes (VAEDecoderConfig v)."""
    from diffusers import AutoencoderKL
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=v.z_channels, norm_num_groups=v.num_groups,
        block_out_channels=[v.ch * m for m in v.ch_mult], layers_per_block=v.num_res_blocks,
        down_block_types=["DownEncoderBlock2D"] * len(v.ch_mult), up_block_types=["UpDecoderBlock2D"] * len(v.ch_mult),
        scaling_factor=v.scale_factor, sample_size=sample_size)


def diffusers_pipeline(cfg, device, dtype):
    """diffusers' UniDiffuserPipeline at the same shapes, random weights. The image encoder and
    caption decoder are unused by text-to-image and built tiny."""
    from diffusers import DPMSolverMultistepScheduler, UniDiffuserPipeline
    from diffusers.pipelines.deprecated.unidiffuser import UniDiffuserTextDecoder
    from transformers import (CLIPTextModel, CLIPTokenizer, CLIPVisionConfig, CLIPVisionModelWithProjection,
                              CLIPImageProcessor)

    from models.text_encoder import clip_text_config

    u = cfg.uvit
    denoiser, autoencoder = unet(u), vae(cfg.vae_decoder, cfg.default_size)   # drawn in this order, as before
    text_encoder = CLIPTextModel(clip_text_config(cfg.text_encoder))
    image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        image_size=32, patch_size=16, projection_dim=u.clip_img_dim))
    text_decoder = UniDiffuserTextDecoder(
        prefix_length=77, prefix_inner_dim=cfg.text_encoder.hidden_size, prefix_hidden_dim=u.text_dim,
        vocab_size=64, n_positions=128, n_embd=32, n_layer=1, n_head=2, n_inner=64)
    scheduler = DPMSolverMultistepScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                            solver_order=3)
    pipe = UniDiffuserPipeline(vae=autoencoder, text_encoder=text_encoder, image_encoder=image_encoder,
                               clip_image_processor=CLIPImageProcessor(), clip_tokenizer=clip_tokenizer(CLIPTokenizer),
                               text_decoder=text_decoder, text_tokenizer=None, unet=denoiser, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device=device, dtype=dtype)
