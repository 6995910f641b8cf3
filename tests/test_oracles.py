"""Each reference network against an independent implementation, on identical random weights.

Our networks (`models/`) are re-implementations; these tests pin them to outside code:

* `UViT`        vs diffusers `UniDiffuserModel` (v1 flavour: post-LN UniDiffuser blocks, data-type token),
* `VAEDecoder`  vs diffusers `AutoencoderKL.decode`,
* `TextEncoder` vs transformers `CLIPTextModel` (eager attention) and a hand-written CLIP text
  transformer, each followed by `encode_prefix` applied by hand.

Weights come from `randomize_` (norm scales and biases away from 1 / 0, so a dropped or swapped
affine shows), are mapped between the two naming layouts by the helpers below, and every test
compares fp32 CPU outputs with ||ours - theirs|| / ||theirs|| <= 1e-5 (max-abs is reported too).
Configs are tiny so the file runs in seconds.

The diffusers oracles use its classic `AttnProcessor` (explicit baddbmm + softmax), so the
attention maths is not shared with our `scaled_dot_product_attention` calls either.
"""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from models.config import PRESETS, TextEncoderConfig, UViTConfig, VAEDecoderConfig
from models.text_encoder import TextEncoder
from models.uvit import UViT
from models.vae_decoder import VAEDecoder
from unidiffuser.weights.random_weights import randomize_

diffusers = pytest.importorskip(
    "diffusers", reason="diffusers is the test-only oracle for the UViT and the VAE decoder (pip install diffusers)"
)
from diffusers import AutoencoderKL  # noqa: E402
from diffusers.models.attention_processor import Attention, AttnProcessor  # noqa: E402
from diffusers.pipelines.deprecated.unidiffuser.modeling_uvit import UniDiffuserModel  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel  # noqa: E402

RTOL = 1e-5
BOS, EOS = 49406, 49407   # CLIP's <|startoftext|> and <|endoftext|> (also its padding)


# --------------------------------------------------------------------------------------------
# comparison helpers
# --------------------------------------------------------------------------------------------

def rel_err(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    """||ours - theirs|| / ||theirs|| (Frobenius, in float64)."""
    ours, theirs = ours.double(), theirs.double()
    return ((ours - theirs).norm() / theirs.norm()).item()


def assert_matches(name: str, ours: torch.Tensor, theirs: torch.Tensor, rtol: float = RTOL) -> None:
    """Same shape, finite, non-trivial reference, and relative error within `rtol`.

    The measured errors are printed (see them with `pytest -s` or `-rP`)."""
    assert ours.shape == theirs.shape, f"{name}: shape {tuple(ours.shape)} != oracle's {tuple(theirs.shape)}"
    assert torch.isfinite(theirs).all() and theirs.abs().max() > 0, f"{name}: degenerate oracle output"
    assert torch.isfinite(ours).all(), f"{name}: non-finite output"
    err = rel_err(ours, theirs)
    max_abs = (ours.double() - theirs.double()).abs().max().item()
    print(f"{name}: rel_err={err:.3e} max_abs={max_abs:.3e} (|oracle|_max={theirs.abs().max().item():.3g})")
    assert err <= rtol, f"{name}: relative error {err:.3e} > {rtol:.0e} (max abs {max_abs:.3e})"


def use_classic_attention(model: torch.nn.Module) -> None:
    """Switch every diffusers Attention of `model` to `AttnProcessor` (baddbmm + softmax)."""
    layers = [m for m in model.modules() if isinstance(m, Attention)]
    assert layers, "no diffusers Attention found"
    for m in layers:
        m.set_processor(AttnProcessor())


def load_exactly(module: torch.nn.Module, state: dict[str, torch.Tensor], unused: set[str] = frozenset()) -> None:
    """load_state_dict that fails unless `state` covers every parameter of `module` except `unused`."""
    missing, unexpected = module.load_state_dict(state, strict=False)
    assert not unexpected, f"mapped keys the oracle does not have: {unexpected}"
    assert set(missing) == set(unused), f"oracle parameters left unmapped: {sorted(set(missing) - set(unused))}"


# --------------------------------------------------------------------------------------------
# 1. UViT vs diffusers UniDiffuserModel
# --------------------------------------------------------------------------------------------

TINY_UVIT = UViTConfig(img_size=8, embed_dim=64, depth=4, num_heads=4, text_dim=8, clip_img_dim=16)

# Our block (thu-ml names) -> diffusers UniDiffuserBlock. The original's norm2 follows the
# attention residual and is diffusers' norm1; norm3 follows the MLP residual in both.
_UVIT_BLOCK_RENAMES = {
    "attn.proj": "attn1.to_out.0",
    "norm2": "norm1",
    "norm3": "norm3",
    "mlp.fc1": "ff.net.0.proj",
    "mlp.fc2": "ff.net.2",
}
_UVIT_TOP_RENAMES = {
    "patch_embed.proj": "vae_img_in.proj",
    "text_embed": "text_in",
    "text_out": "text_out",
    "clip_img_embed": "clip_img_in",
    "clip_img_out": "clip_img_out",
    "token_embedding": "data_type_token_embedding",
    "pos_embed_token": "data_type_pos_embed_token",
    "pos_embed": "pos_embed",
    "norm": "transformer.norm_out",
    "decoder_pred": "vae_img_out",
}


def diffusers_uvit_config(cfg: UViTConfig, sample_size: int | None = None) -> dict:
    """UniDiffuserModel config equal to our v1-style UViT (flags as in diffusers' conversion of
    UniDiffuser-v1: post-LN 'unidiffuser' blocks, raw sinusoidal time tokens, no patch pos-embed,
    exact GELU MLP of ratio 4, data-type token)."""
    assert cfg.embed_dim % cfg.num_heads == 0 and cfg.mlp_ratio == 4  # FeedForward's default mult
    return dict(
        text_dim=cfg.text_dim,
        clip_img_dim=cfg.clip_img_dim,
        num_text_tokens=cfg.num_text_tokens,
        num_attention_heads=cfg.num_heads,
        attention_head_dim=cfg.embed_dim // cfg.num_heads,
        in_channels=cfg.in_chans,
        out_channels=cfg.in_chans,
        num_layers=cfg.depth,
        dropout=0.0,
        attention_bias=cfg.qkv_bias,
        sample_size=sample_size or cfg.img_size,
        patch_size=cfg.patch_size,
        activation_fn="gelu",
        norm_type="layer_norm",
        block_type="unidiffuser",
        pre_layer_norm=False,
        use_timestep_embedding=False,
        norm_elementwise_affine=True,
        use_patch_pos_embed=False,
        ff_final_dropout=True,
        use_data_type_embedding=True,
    )


def uvit_to_diffusers(ours: dict[str, torch.Tensor], cfg: UViTConfig) -> dict[str, torch.Tensor]:
    """Our (= thu-ml) UViT state dict -> UniDiffuserModel's: fused qkv split into to_q/k/v, blocks
    moved under `transformer.`, each out-block's skip_linear/norm1 into its SkipBlock."""
    D = cfg.embed_dim
    out: dict[str, torch.Tensor] = {}
    consumed = set()

    def put(src: str, dst: str) -> None:
        out[dst] = ours[src].clone()
        consumed.add(src)

    for src, dst in _UVIT_TOP_RENAMES.items():
        for suffix in ("", ".weight", ".bias"):
            if src + suffix in ours:
                put(src + suffix, dst + suffix)

    def block(src: str, dst: str) -> None:
        for suffix in ("weight", "bias"):
            qkv = f"{src}.attn.qkv.{suffix}"
            if qkv in ours:
                for part, name in zip(ours[qkv].split(D, dim=0), ("to_q", "to_k", "to_v")):
                    out[f"{dst}.attn1.{name}.{suffix}"] = part.clone()
                consumed.add(qkv)
            for a, b in _UVIT_BLOCK_RENAMES.items():
                put(f"{src}.{a}.{suffix}", f"{dst}.{b}.{suffix}")

    for i in range(cfg.depth // 2):
        block(f"in_blocks.{i}", f"transformer.transformer_in_blocks.{i}")
        block(f"out_blocks.{i}", f"transformer.transformer_out_blocks.{i}.block")
        for suffix in ("weight", "bias"):
            put(f"out_blocks.{i}.skip_linear.{suffix}", f"transformer.transformer_out_blocks.{i}.skip.skip_linear.{suffix}")
            put(f"out_blocks.{i}.norm1.{suffix}", f"transformer.transformer_out_blocks.{i}.skip.norm.{suffix}")
    block("mid_block", "transformer.transformer_mid_block")

    assert consumed == set(ours), f"our parameters the mapping missed: {sorted(set(ours) - consumed)}"
    return out


# UTransformer2DModel owns a PatchEmbed that UniDiffuserModel.forward never calls.
_DIFFUSERS_UVIT_UNUSED = {"transformer.pos_embed.proj.weight", "transformer.pos_embed.proj.bias"}


def bilinear_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """[n_out, n_in] weights of 1-D linear resampling with half-pixel centres (align_corners=False,
    source index clamped at 0), written out by hand: the oracle for the positional-embedding resize."""
    A = torch.zeros(n_out, n_in, dtype=torch.float64)
    for o in range(n_out):
        src = max((o + 0.5) * n_in / n_out - 0.5, 0.0)
        i0 = min(int(math.floor(src)), n_in - 1)
        i1 = min(i0 + 1, n_in - 1)
        lam = src - i0
        A[o, i0] += 1 - lam
        A[o, i1] += lam
    return A


def resized_patch_pos_embed(pos_embed: torch.Tensor, cfg: UViTConfig, h: int, w: int) -> torch.Tensor:
    """Patch part of `pos_embed` [1, N, D] bilinearly resized from the trained g x g grid to h x w
    (what the original `interpolate_pos_emb` does), via separable interpolation matrices."""
    g = cfg.img_size // cfg.patch_size
    grid = pos_embed[0, -cfg.num_patches:].double().reshape(g, g, -1)           # (row, col, D)
    grid = torch.einsum("ir,rcd,jc->ijd", bilinear_matrix(g, h), grid, bilinear_matrix(g, w))
    return grid.reshape(1, h * w, -1).float()


def make_diffusers_uvit(cfg: UViTConfig, ours: UViT, latent_hw: tuple[int, int] | None = None) -> UniDiffuserModel:
    """A UniDiffuserModel holding our weights. diffusers' UViT only runs at its configured square
    `sample_size` and never interpolates; for another square latent side we build it at that size
    and give it the hand-resized patch positional embedding."""
    side = cfg.img_size if latent_hw is None else latent_hw[0]
    assert latent_hw is None or latent_hw[0] == latent_hw[1]
    model = UniDiffuserModel(**diffusers_uvit_config(cfg, sample_size=side)).eval()
    use_classic_attention(model)
    state = uvit_to_diffusers(ours.state_dict(), cfg)
    if side != cfg.img_size:
        g = side // cfg.patch_size
        pos = state["pos_embed"]
        state["pos_embed"] = torch.cat([pos[:, : -cfg.num_patches], resized_patch_pos_embed(pos, cfg, g, g)], dim=1)
    load_exactly(model, state, _DIFFUSERS_UVIT_UNUSED)
    return model


def diffusers_uvit_any_size(model: UniDiffuserModel, cfg: UViTConfig, img, clip_img, text, t_img, t_text, data_type):
    """UniDiffuserModel's layers with the original UViT's forward glue written out here, for a
    non-square latent (diffusers' own forward assumes a square one): tokens [t_img, t_text,
    data_type, text, clip_img, patches] + positional embedding with the patch part resized by
    hand, diffusers' U-transformer, output heads, and unpatchify 'B (h w) (p q C) -> B C (h p) (w q)'."""
    B, C, H, W = img.shape
    p = cfg.patch_size
    h, w = H // p, W // p
    tokens = torch.cat([
        model.timestep_img_proj(t_img)[:, None],
        model.timestep_text_proj(t_text)[:, None],
        model.data_type_token_embedding(data_type)[:, None],
        model.text_in(text),
        model.clip_img_in(clip_img),
        model.vae_img_in(img),
    ], dim=1)
    pos = model.pos_embed
    pos = torch.cat([pos[:, :2], model.data_type_pos_embed_token, pos[:, 2: -cfg.num_patches],
                     resized_patch_pos_embed(pos, cfg, h, w)], dim=1)
    x = model.transformer(tokens + pos, hidden_states_is_embedding=True, unpatchify=False, return_dict=False)[0]
    _, text_out, clip_out, img_out = x.split([3, text.shape[1], 1, h * w], dim=1)
    img_out = model.vae_img_out(img_out).reshape(B, h, w, p, p, C)
    img_out = torch.einsum("nhwpqc->nchpwq", img_out).reshape(B, C, H, W)
    return img_out, model.clip_img_out(clip_out), model.text_out(text_out)


def uvit_inputs(cfg: UViTConfig, H: int, W: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    B = 2
    return dict(
        img=torch.randn(B, cfg.in_chans, H, W, generator=g),
        clip_img=torch.randn(B, 1, cfg.clip_img_dim, generator=g),
        text=torch.randn(B, cfg.num_text_tokens, cfg.text_dim, generator=g),
        t_img=torch.tensor([371.625, 12.3]),          # fractional, as DPM-Solver++ produces
        t_text=torch.tensor([0.0, 999.0]),
        data_type=torch.tensor([1, 0]),
    )


def make_uvit(cfg: UViTConfig, seed: int = 0) -> UViT:
    return randomize_(UViT(cfg), torch.Generator().manual_seed(seed)).eval()


@pytest.mark.parametrize("qkv_bias", [False, True], ids=["qkv_bias=False", "qkv_bias=True"])
@torch.no_grad()
def test_uvit_matches_diffusers_at_default_size(qkv_bias):
    """All three outputs (latent, CLIP-image, text noise predictions) at the trained latent size,
    where neither side interpolates; diffusers' forward is used as is."""
    cfg = dataclasses.replace(TINY_UVIT, qkv_bias=qkv_bias)
    ours = make_uvit(cfg)
    theirs = make_diffusers_uvit(cfg, ours)
    x = uvit_inputs(cfg, cfg.img_size, cfg.img_size)
    got = ours(**x)
    want = theirs(x["img"], x["clip_img"], x["text"], x["t_img"], x["t_text"], data_type=x["data_type"])
    for name, a, b in zip(("img_out", "clip_img_out", "text_out"), got, want):
        assert_matches(f"uvit[{cfg.img_size}x{cfg.img_size}].{name}", a, b)


@pytest.mark.parametrize("side", [12, 6])
@torch.no_grad()
def test_uvit_matches_diffusers_at_other_square_size(side):
    """A square latent of another side: ours interpolates pos_embed's patch part bilinearly; the
    oracle is diffusers built at that size with the patch embedding resized by hand-written
    interpolation weights (diffusers itself does not interpolate)."""
    cfg = TINY_UVIT
    ours = make_uvit(cfg)
    theirs = make_diffusers_uvit(cfg, ours, latent_hw=(side, side))
    x = uvit_inputs(cfg, side, side)
    got = ours(**x)
    want = theirs(x["img"], x["clip_img"], x["text"], x["t_img"], x["t_text"], data_type=x["data_type"])
    for name, a, b in zip(("img_out", "clip_img_out", "text_out"), got, want):
        assert_matches(f"uvit[{side}x{side}].{name}", a, b)


@pytest.mark.parametrize("hw", [(8, 12), (10, 6)], ids=lambda hw: f"{hw[0]}x{hw[1]}")
@torch.no_grad()
def test_uvit_matches_diffusers_layers_at_non_square_size(hw):
    """A non-square latent (diffusers' forward cannot run one: it unpatchifies with
    h = w = sqrt(tokens)). The oracle runs diffusers' embeddings, U-transformer and heads with the
    original UViT's glue written out in this file, which catches h/w mix-ups in our positional
    resize and unpatchify."""
    cfg = TINY_UVIT
    ours = make_uvit(cfg)
    theirs = make_diffusers_uvit(cfg, ours)
    x = uvit_inputs(cfg, *hw)
    got = ours(**x)
    want = diffusers_uvit_any_size(theirs, cfg, **x)
    for name, a, b in zip(("img_out", "clip_img_out", "text_out"), got, want):
        assert_matches(f"uvit[{hw[0]}x{hw[1]}].{name}", a, b)


@torch.no_grad()
def test_non_square_glue_agrees_with_diffusers_forward_when_square():
    """Validates the hand-written glue above: at the default (square) size it must reproduce
    diffusers' own forward, so the non-square oracle is trustworthy."""
    cfg = TINY_UVIT
    theirs = make_diffusers_uvit(cfg, make_uvit(cfg))
    x = uvit_inputs(cfg, cfg.img_size, cfg.img_size)
    want = theirs(x["img"], x["clip_img"], x["text"], x["t_img"], x["t_text"], data_type=x["data_type"])
    got = diffusers_uvit_any_size(theirs, cfg, **x)
    for name, a, b in zip(("img_out", "clip_img_out", "text_out"), got, want):
        assert_matches(f"glue.{name}", a, b, rtol=1e-6)


# --------------------------------------------------------------------------------------------
# 2. VAEDecoder vs diffusers AutoencoderKL
# --------------------------------------------------------------------------------------------

def diffusers_vae_config(cfg: VAEDecoderConfig) -> dict:
    levels = len(cfg.ch_mult)
    assert cfg.z_channels == cfg.embed_dim   # diffusers' post_quant_conv is latent -> latent
    return dict(
        in_channels=cfg.out_ch,
        out_channels=cfg.out_ch,
        down_block_types=["DownEncoderBlock2D"] * levels,
        up_block_types=["UpDecoderBlock2D"] * levels,
        block_out_channels=[cfg.ch * m for m in cfg.ch_mult],
        layers_per_block=cfg.num_res_blocks,
        latent_channels=cfg.z_channels,
        norm_num_groups=cfg.num_groups,
        scaling_factor=cfg.scale_factor,
    )


def _vae_resnet_keys(src: str, dst: str, ours: dict) -> dict[str, str]:
    names = ["norm1", "conv1", "norm2", "conv2"] + (["nin_shortcut"] if f"{src}.nin_shortcut.weight" in ours else [])
    return {f"{src}.{n}.{s}": f"{dst}.{n.replace('nin_shortcut', 'conv_shortcut')}.{s}"
            for n in names for s in ("weight", "bias")}


def vae_decoder_to_diffusers(ours: dict[str, torch.Tensor], cfg: VAEDecoderConfig) -> dict[str, torch.Tensor]:
    """LDM decoder names -> diffusers AutoencoderKL. diffusers numbers up-blocks in execution order
    (lowest resolution first), LDM by resolution level: our up.{L-1-i} is its up_blocks.{i}. The mid
    attention's 1x1 convs become Linear weights."""
    levels = len(cfg.ch_mult)
    keys: dict[str, str] = {}
    for s in ("weight", "bias"):
        keys[f"post_quant_conv.{s}"] = f"post_quant_conv.{s}"
        keys[f"decoder.conv_in.{s}"] = f"decoder.conv_in.{s}"
        keys[f"decoder.norm_out.{s}"] = f"decoder.conv_norm_out.{s}"
        keys[f"decoder.conv_out.{s}"] = f"decoder.conv_out.{s}"
        for a, b in (("norm", "group_norm"), ("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj_out", "to_out.0")):
            keys[f"decoder.mid.attn_1.{a}.{s}"] = f"decoder.mid_block.attentions.0.{b}.{s}"
    for j in (1, 2):
        keys.update(_vae_resnet_keys(f"decoder.mid.block_{j}", f"decoder.mid_block.resnets.{j - 1}", ours))
    for i in range(levels):
        src, dst = f"decoder.up.{levels - 1 - i}", f"decoder.up_blocks.{i}"
        for j in range(cfg.num_res_blocks + 1):
            keys.update(_vae_resnet_keys(f"{src}.block.{j}", f"{dst}.resnets.{j}", ours))
        if i != levels - 1:
            for s in ("weight", "bias"):
                keys[f"{src}.upsample.conv.{s}"] = f"{dst}.upsamplers.0.conv.{s}"

    assert set(keys) == set(ours), f"unmapped: {sorted(set(ours) - set(keys))}, absent: {sorted(set(keys) - set(ours))}"
    out = {}
    for src, dst in keys.items():
        t = ours[src].clone()
        if ".attentions.0.to_" in dst and t.ndim == 4:
            t = t[:, :, 0, 0]
        out[dst] = t
    return out


def make_diffusers_vae(cfg: VAEDecoderConfig, ours: VAEDecoder) -> AutoencoderKL:
    vae = AutoencoderKL(**diffusers_vae_config(cfg)).eval()
    use_classic_attention(vae)
    encoder_side = {k for k in vae.state_dict() if k.startswith(("encoder.", "quant_conv."))}
    load_exactly(vae, vae_decoder_to_diffusers(ours.state_dict(), cfg), encoder_side)
    return vae


@pytest.mark.parametrize(
    "cfg,latent_hw",
    [(PRESETS["tiny"].vae_decoder, (6, 5)), (PRESETS["v1"].vae_decoder, (8, 6))],
    ids=["tiny", "v1"],
)
@torch.no_grad()
def test_vae_decoder_matches_diffusers(cfg, latent_hw):
    """Decode path: z / scale_factor -> post_quant_conv -> decoder, against
    AutoencoderKL.decode(z / scaling_factor). A non-square latent catches H/W swaps in the mid
    attention's reshapes; the v1 structure (ch 128, mult 1-2-4-4, 2 res blocks) at a small latent."""
    ours = randomize_(VAEDecoder(cfg), torch.Generator().manual_seed(0)).eval()
    theirs = make_diffusers_vae(cfg, ours)
    z = torch.randn(2, cfg.embed_dim, *latent_hw, generator=torch.Generator().manual_seed(1))
    got = ours(z)
    want = theirs.decode(z / theirs.config.scaling_factor).sample
    assert want.shape == (2, cfg.out_ch, latent_hw[0] * cfg.downsample, latent_hw[1] * cfg.downsample)
    assert_matches(f"vae[{'x'.join(map(str, latent_hw))}]", got, want)


# --------------------------------------------------------------------------------------------
# 3. TextEncoder vs transformers CLIPTextModel (eager) and a hand-written CLIP text transformer
# --------------------------------------------------------------------------------------------

def clip_input_ids(cfg: TextEncoderConfig, seed: int = 1) -> torch.Tensor:
    """Two prompts as the CLIP tokenizer lays them out: <bos> tokens <eos>, padded with <eos> to 77;
    one short, one filling the context."""
    g = torch.Generator().manual_seed(seed)
    L = cfg.max_position_embeddings
    ids = torch.full((2, L), EOS, dtype=torch.long)
    for row, n in enumerate((9, L - 2)):
        ids[row, 0] = BOS
        ids[row, 1: 1 + n] = torch.randint(0, BOS, (n,), generator=g)
    return ids


def make_text_encoder(cfg: TextEncoderConfig) -> TextEncoder:
    return randomize_(TextEncoder(cfg), torch.Generator().manual_seed(0)).eval()


def clip_text_state(ours: TextEncoder) -> dict[str, torch.Tensor]:
    """Our `text_model.*` parameters without the prefix (transformers 5's CLIPTextModel is flat;
    4.x nests the transformer under `.text_model`, handled by the caller)."""
    prefix = "text_model."
    return {k[len(prefix):]: v for k, v in ours.state_dict().items() if k.startswith(prefix)}


def encode_prefix(ours: TextEncoder, hidden: torch.Tensor) -> torch.Tensor:
    return hidden @ ours.encode_prefix.weight.T + ours.encode_prefix.bias


@torch.no_grad()
def test_text_encoder_matches_transformers_clip_eager():
    """CLIPTextModel built from the config fields, eager attention, loaded from our text_model.*
    weights; last_hidden_state then encode_prefix by hand. Checks the key layout, the config
    (act, eps, causal mask) and our SDPA attention path."""
    cfg = PRESETS["tiny"].text_encoder
    ours = make_text_encoder(cfg)
    config = CLIPTextConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        max_position_embeddings=cfg.max_position_embeddings, hidden_act=cfg.hidden_act,
        layer_norm_eps=cfg.layer_norm_eps, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=EOS,
    )
    config._attn_implementation = "eager"
    oracle = CLIPTextModel(config).eval()
    assert oracle.config._attn_implementation == "eager"
    target = getattr(oracle, "text_model", oracle)
    target.load_state_dict(clip_text_state(ours), strict=True)

    ids = clip_input_ids(cfg)
    want = encode_prefix(ours, oracle(input_ids=ids).last_hidden_state)
    assert_matches("text_encoder.vs_transformers_eager", ours(ids), want)


def reference_clip_text(state: dict[str, torch.Tensor], cfg: TextEncoderConfig, ids: torch.Tensor) -> torch.Tensor:
    """CLIP's text transformer from its definition (Radford et al. 2021; openai/CLIP model.py):
    token + position embeddings, pre-LN blocks with causal multi-head self-attention and a
    quick-GELU MLP, final LayerNorm. Written with plain tensor ops, in float64."""
    S = {k: v.double() for k, v in state.items()}
    B, L = ids.shape
    D, nh = cfg.hidden_size, cfg.num_attention_heads
    hd = D // nh
    eps = cfg.layer_norm_eps
    assert cfg.hidden_act == "quick_gelu"

    def ln(x, name):
        return F.layer_norm(x, (D,), S[f"{name}.weight"], S[f"{name}.bias"], eps)

    def lin(x, name):
        return x @ S[f"{name}.weight"].T + S[f"{name}.bias"]

    x = S["embeddings.token_embedding.weight"][ids] + S["embeddings.position_embedding.weight"][:L]
    causal = torch.full((L, L), float("-inf"), dtype=torch.float64).triu(1)
    for i in range(cfg.num_hidden_layers):
        p = f"encoder.layers.{i}"
        h = ln(x, f"{p}.layer_norm1")
        q, k, v = (lin(h, f"{p}.self_attn.{n}_proj").view(B, L, nh, hd).transpose(1, 2) for n in "qkv")
        att = (q @ k.transpose(-1, -2)) / math.sqrt(hd) + causal
        h = (att.softmax(-1) @ v).transpose(1, 2).reshape(B, L, D)
        x = x + lin(h, f"{p}.self_attn.out_proj")
        h = lin(ln(x, f"{p}.layer_norm2"), f"{p}.mlp.fc1")
        x = x + lin(h * torch.sigmoid(1.702 * h), f"{p}.mlp.fc2")
    return ln(x, "final_layer_norm")


@torch.no_grad()
def test_text_encoder_matches_hand_written_clip():
    """The same encoder against CLIP's maths written out here, independent of transformers (which
    our TextEncoder itself wraps, so the test above alone could not catch a transformers-side or
    config-default mistake, e.g. a missing causal mask or a wrong activation)."""
    cfg = PRESETS["tiny"].text_encoder
    ours = make_text_encoder(cfg)
    ids = clip_input_ids(cfg)
    hidden = reference_clip_text(clip_text_state(ours), cfg, ids)
    want = encode_prefix(ours, hidden.float())
    assert_matches("text_encoder.vs_hand_written", ours(ids), want)
