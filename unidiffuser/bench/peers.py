"""diffusers' UniDiffuserPipeline at our shapes with random weights: the peer we are compared to.

Every network a task runs is drawn at the preset's full shapes (for v1: the image encoder a
CLIP ViT-B/32 vision tower, the text decoder GPT-2 124M); the two that only the image-reading
and text-writing modes run are drawn tiny for the others, which never call them."""
from __future__ import annotations

import tempfile
from pathlib import Path

from .. import caption_tokenizer, tokenizer

# The pipeline's modes that each task chains (the caption of the first is the prompt of the
# second for i2t2i, the image of the first is the input of the second for t2i2t).
PEER_MODES = {"t2i": ("text2img",), "i2t": ("img2text",), "joint": ("joint",), "i": ("img",), "t": ("text",),
              "i2t2i": ("img2text", "text2img"), "t2i2t": ("text2img", "img2text")}
EOS = "<|EOS|>"     # the caption decoder's added end token, id 50257 (CaptionDecoderConfig.eos_token_id)


def uses_image_encoder(task: str) -> bool:
    return "img2text" in PEER_MODES[task]


def uses_text_decoder(task: str) -> bool:
    return any(m in ("img2text", "joint", "text") for m in PEER_MODES[task])


def quiet() -> None:
    """diffusers' and transformers' warnings off (deprecation, prompts truncated at 77 tokens):
    the child's output is its measurements."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging
    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()


def clip_tokenizer(cls):
    """transformers' CLIPTokenizer (diffusers' pipeline wants one) on CLIP's BPE files."""
    with tempfile.TemporaryDirectory(prefix="bench-tok-") as tmp:
        tokenizer.write_tokenizer_files(Path(tmp))
        return cls.from_pretrained(tmp, model_max_length=77)


def gpt2_tokenizer():
    """transformers' GPT2Tokenizer on the random stand-in vocabulary (caption_tokenizer's files),
    with the caption decoder's <|EOS|> added as its end token, as the text decoder expects."""
    from transformers import GPT2Tokenizer
    with tempfile.TemporaryDirectory(prefix="bench-gpt2-") as tmp:
        caption_tokenizer.write_random_files(Path(tmp))
        tok = GPT2Tokenizer.from_pretrained(tmp)
    tok.add_special_tokens({"eos_token": EOS})
    return tok


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


def image_encoder(cfg, full: bool):
    """CLIPVisionModelWithProjection: the preset's (v1: ViT-B/32, hidden 768, 12 layers, 12 heads,
    patch 32, image 224, projection 512), or a tiny stand-in with the same projection."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection
    e = cfg.image_encoder
    if full:
        return CLIPVisionModelWithProjection(CLIPVisionConfig(**e.clip_fields(), projection_dim=e.projection_dim))
    return CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        image_size=32, patch_size=16, projection_dim=cfg.uvit.clip_img_dim))


def text_decoder(cfg, full: bool):
    """UniDiffuserTextDecoder: the preset's GPT-2 (v1: 124M, n_embd 768, 12 layers, 12 heads,
    vocabulary 50258 with <|EOS|>), or a tiny stand-in with the same prefix shapes."""
    from diffusers.pipelines.deprecated.unidiffuser import UniDiffuserTextDecoder
    c = cfg.caption_decoder
    prefix = dict(prefix_length=c.prefix_length, prefix_inner_dim=cfg.text_encoder.hidden_size,
                  prefix_hidden_dim=cfg.uvit.text_dim)
    if full:
        return UniDiffuserTextDecoder(**prefix, vocab_size=c.vocab_size, n_positions=c.n_positions, n_embd=c.n_embd,
                                      n_layer=c.n_layer, n_head=c.n_head, layer_norm_epsilon=c.layer_norm_epsilon)
    return UniDiffuserTextDecoder(**prefix, vocab_size=64, n_positions=128, n_embd=32, n_layer=1, n_head=2, n_inner=64)


def networks(cfg, task: str) -> dict:
    """The pipeline's networks, default-initialised (random), in the order drawn before."""
    from transformers import CLIPTextModel

    from models.text_encoder import clip_text_config
    nets = {"unet": unet(cfg.uvit), "vae": vae(cfg.vae_decoder, cfg.default_size),
            "text_encoder": CLIPTextModel(clip_text_config(cfg.text_encoder))}
    nets["image_encoder"] = image_encoder(cfg, uses_image_encoder(task))
    nets["text_decoder"] = text_decoder(cfg, uses_text_decoder(task))
    return nets


def drawn_on(device, cfg, task: str) -> dict:
    """networks() drawn on the device (torch's default-device context: seconds instead of ~15 s of
    CPU initialisation for v1); on the CPU again if a constructor cannot draw there."""
    import torch
    if torch.device(device).type == "cpu":
        return networks(cfg, task)
    try:
        with torch.device(device):
            return networks(cfg, task)
    except (RuntimeError, TypeError, ValueError) as e:
        print(f"diffusers' networks could not be drawn on {device} ({type(e).__name__}: {e}); drawing them "
              "on the CPU", flush=True)
        return networks(cfg, task)


def diffusers_pipeline(cfg, device, dtype, task: str = "t2i"):
    """diffusers' UniDiffuserPipeline at the same shapes, random weights, for `task` (PEER_MODES):
    the image encoder and text decoder at full size where the task runs them, else tiny."""
    from diffusers import DPMSolverMultistepScheduler, UniDiffuserPipeline
    from transformers import CLIPImageProcessor, CLIPTokenizer

    nets = drawn_on(device, cfg, task)
    scheduler = DPMSolverMultistepScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                            solver_order=3)
    text_tokenizer = gpt2_tokenizer() if uses_text_decoder(task) else None
    pipe = UniDiffuserPipeline(**nets, clip_image_processor=CLIPImageProcessor(),
                               clip_tokenizer=clip_tokenizer(CLIPTokenizer), text_tokenizer=text_tokenizer,
                               scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device=device, dtype=dtype)
