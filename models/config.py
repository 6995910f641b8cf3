"""Network configurations as data: one dataclass per network, and presets of all three.

`v1` is UniDiffuser-v1 (thu-ml/unidiffuser `configs/sample_unidiffuser_v1.py`, LDM KL-f8,
openai/clip-vit-large-patch14). `tiny` keeps every structural feature (long skips, the
data-type token, mid attention, 8x latent factor, 77 CLIP tokens) at widths a 2-core CPU
runs in milliseconds, for tests; `tiny-fmha` is tiny with v1's UViT head size (64), for the
engine tests' fused-attention path.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass(frozen=True)
class UViTConfig:
    img_size: int = 64            # latent side the positional embedding was trained for
    in_chans: int = 4
    patch_size: int = 2
    embed_dim: int = 1536
    depth: int = 30               # depth // 2 in-blocks, one mid block, depth // 2 out-blocks
    num_heads: int = 24
    mlp_ratio: int = 4
    qkv_bias: bool = False
    text_dim: int = 64
    num_text_tokens: int = 77
    clip_img_dim: int = 512

    @property
    def num_patches(self) -> int:
        return (self.img_size // self.patch_size) ** 2

    @property
    def num_tokens(self) -> int:
        """Tokens in `pos_embed`: t_img, t_text, text, clip_img, patches (the data-type
        token has its own `pos_embed_token`)."""
        return 1 + 1 + self.num_text_tokens + 1 + self.num_patches

    def sequence_length(self, latent_h: int, latent_w: int) -> int:
        """Tokens of one UViT call on an h x w latent: `num_tokens`' kinds at that size, plus the
        data-type token."""
        return 1 + 1 + 1 + self.num_text_tokens + 1 + (latent_h // self.patch_size) * (latent_w // self.patch_size)


@dataclass(frozen=True)
class TextEncoderConfig:
    # transformers.CLIPTextConfig fields of openai/clip-vit-large-patch14
    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    # the caption decoder's encode_prefix: Linear(hidden_size -> prefix_dim)
    prefix_dim: int = 64

    def clip_fields(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "prefix_dim"}


@dataclass(frozen=True)
class VAEDecoderConfig:
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 4
    embed_dim: int = 4            # channels of the latent that post_quant_conv reads
    out_ch: int = 3
    num_groups: int = 32
    eps: float = 1e-6
    scale_factor: float = 0.18215

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


# The KL-f8 encoder (models/vae_encoder.py) needs no config of its own: `VAEDecoderConfig`
# describes the whole autoencoder (ch, ch_mult, num_res_blocks, z_channels, embed_dim; out_ch is
# the image's channels; the original always has double_z=True).


@dataclass(frozen=True)
class ImageEncoderConfig:
    # transformers.CLIPVisionConfig fields of openai/clip-vit-base-patch32 (the original's
    # clip.load("ViT-B/32") image tower): image_size / patch_size patches plus the class token.
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int = 512     # = UViTConfig.clip_img_dim

    @property
    def num_positions(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1

    def clip_fields(self) -> dict:
        """The fields transformers' CLIPVisionConfig has under the same names."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "projection_dim"}


@dataclass(frozen=True)
class CaptionDecoderConfig:
    # decode_prefix: Linear(prefix_dim -> n_embd), then GPT-2 on the 77 prefix embeddings
    prefix_dim: int = 64          # = TextEncoderConfig.prefix_dim = UViTConfig.text_dim
    prefix_length: int = 77
    # GPT-2 124M ("gpt2") with the caption decoder's added '<|EOS|>' token (id 50257)
    vocab_size: int = 50258
    eos_token_id: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    layer_norm_epsilon: float = 1e-5
    # generate_beam's defaults in libs/caption_decoder.py
    beam_size: int = 5
    max_new_tokens: int = 67


@dataclass(frozen=True)
class ModelConfig:
    uvit: UViTConfig = field(default_factory=UViTConfig)
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    vae_decoder: VAEDecoderConfig = field(default_factory=VAEDecoderConfig)
    image_encoder: ImageEncoderConfig = field(default_factory=ImageEncoderConfig)
    caption_decoder: CaptionDecoderConfig = field(default_factory=CaptionDecoderConfig)

    @property
    def default_size(self) -> int:
        """Image side (pixels) at which the UViT needs no positional-embedding interpolation."""
        return self.uvit.img_size * self.vae_decoder.downsample

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        try:
            vae = dict(d["vae_decoder"])
            vae["ch_mult"] = tuple(vae["ch_mult"])
            # A folder converted for text-to-image only has no image_encoder / caption_decoder:
            # the defaults stand in (those networks are not in that folder either).
            return cls(UViTConfig(**d["uvit"]), TextEncoderConfig(**d["text_encoder"]), VAEDecoderConfig(**vae),
                       ImageEncoderConfig(**d.get("image_encoder", {})),
                       CaptionDecoderConfig(**d.get("caption_decoder", {})))
        except (KeyError, TypeError) as e:
            raise ValueError(f"model config is missing or has unknown fields: {e}") from None


PRESETS: dict[str, ModelConfig] = {
    "v1": ModelConfig(),
    "tiny": ModelConfig(
        uvit=UViTConfig(img_size=16, embed_dim=32, depth=4, num_heads=2, text_dim=8, clip_img_dim=16),
        text_encoder=TextEncoderConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=2, prefix_dim=8),
        vae_decoder=VAEDecoderConfig(ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1),
        # projection_dim = the UViT's clip_img_dim, prefix_dim = its text_dim; the caption decoder
        # keeps the full GPT-2 vocabulary so that its ids stay valid for the real tokenizer.
        image_encoder=ImageEncoderConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, projection_dim=16),
        caption_decoder=CaptionDecoderConfig(prefix_dim=8, n_embd=32, n_layer=2, n_head=2, n_positions=256),
    ),
}
# tiny with v1's UViT head size, 64 (embed_dim 128, 2 heads; 1 in-, 1 mid-, 1 out-block): the head
# size TensorRT-LLM's fused attention has, so the engine tests build that path (tiny's is 16).
PRESETS["tiny-fmha"] = dataclasses.replace(
    PRESETS["tiny"], uvit=UViTConfig(img_size=16, embed_dim=128, depth=2, num_heads=2, text_dim=8, clip_img_dim=16))
