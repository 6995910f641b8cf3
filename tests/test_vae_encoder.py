"""models/vae_encoder.py against diffusers' AutoencoderKL (its encoder, quant_conv and
DiagonalGaussianDistribution) on identical random weights, fp32 on the CPU, plus the
checkpoint-layout helpers. The GPU test compares fp16 with fp32 on CUDA.

diffusers is the dev pin set's test oracle only (requirements-dev.txt); under the compat pins
the oracle tests skip with that reason and the layout tests still run.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from models.config import PRESETS, VAEDecoderConfig
from models.vae_decoder import VAEDecoder
from models.vae_encoder import KEY_PREFIXES, VAEEncoder, original_state_dict, random_original

RTOL = 1e-5
TINY = PRESETS["tiny"].vae_decoder
V1 = PRESETS["v1"].vae_decoder


def rel_err(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    ours, theirs = ours.double(), theirs.double()
    return ((ours - theirs).norm() / theirs.norm()).item()


def assert_matches(name: str, ours: torch.Tensor, theirs: torch.Tensor, rtol: float = RTOL) -> None:
    assert ours.shape == theirs.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(theirs.shape)}"
    assert torch.isfinite(theirs).all() and theirs.abs().max() > 0, f"{name}: degenerate reference"
    err = rel_err(ours, theirs)
    max_abs = (ours.double() - theirs.double()).abs().max().item()
    print(f"{name}: rel_err={err:.3e} max_abs={max_abs:.3e}")
    assert err <= rtol, f"{name}: relative error {err:.3e} > {rtol:.0e} (max abs {max_abs:.3e})"


def make_encoder(cfg: VAEDecoderConfig, seed: int = 0) -> VAEEncoder:
    enc = VAEEncoder(cfg).eval()
    enc.load_state_dict(random_original(cfg, torch.Generator().manual_seed(seed)), strict=True)
    return enc


# --------------------------------------------------------------------------------------------
# diffusers oracle

def diffusers():
    return pytest.importorskip("diffusers", reason="diffusers is the test-only oracle (requirements-dev.txt)")


def _resnet_keys(src: str, dst: str, ours: dict) -> dict[str, str]:
    names = ["norm1", "conv1", "norm2", "conv2"] + (["nin_shortcut"] if f"{src}.nin_shortcut.weight" in ours else [])
    return {f"{src}.{n}.{s}": f"{dst}.{n.replace('nin_shortcut', 'conv_shortcut')}.{s}"
            for n in names for s in ("weight", "bias")}


def encoder_to_diffusers(ours: dict[str, torch.Tensor], cfg: VAEDecoderConfig) -> dict[str, torch.Tensor]:
    """LDM encoder names -> AutoencoderKL's (the renames of diffusers' LDM conversion): down.i.block.j
    -> down_blocks.i.resnets.j, downsample -> downsamplers.0, mid.block_1/2 -> mid_block.resnets.0/1,
    mid.attn_1 q/k/v/proj_out (1x1 convs) -> attentions.0 to_q/to_k/to_v/to_out.0 (Linear)."""
    keys: dict[str, str] = {}
    for s in ("weight", "bias"):
        keys[f"quant_conv.{s}"] = f"quant_conv.{s}"
        keys[f"encoder.conv_in.{s}"] = f"encoder.conv_in.{s}"
        keys[f"encoder.norm_out.{s}"] = f"encoder.conv_norm_out.{s}"
        keys[f"encoder.conv_out.{s}"] = f"encoder.conv_out.{s}"
        for a, b in (("norm", "group_norm"), ("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj_out", "to_out.0")):
            keys[f"encoder.mid.attn_1.{a}.{s}"] = f"encoder.mid_block.attentions.0.{b}.{s}"
        for i in range(len(cfg.ch_mult) - 1):
            keys[f"encoder.down.{i}.downsample.conv.{s}"] = f"encoder.down_blocks.{i}.downsamplers.0.conv.{s}"
    for j in (1, 2):
        keys.update(_resnet_keys(f"encoder.mid.block_{j}", f"encoder.mid_block.resnets.{j - 1}", ours))
    for i in range(len(cfg.ch_mult)):
        for j in range(cfg.num_res_blocks):
            keys.update(_resnet_keys(f"encoder.down.{i}.block.{j}", f"encoder.down_blocks.{i}.resnets.{j}", ours))
    assert set(keys) == set(ours), f"unmapped: {sorted(set(ours) - set(keys))}, absent: {sorted(set(keys) - set(ours))}"
    out = {}
    for src, dst in keys.items():
        t = ours[src].clone()
        out[dst] = t[:, :, 0, 0] if ".attentions.0.to_" in dst and t.ndim == 4 else t
    return out


def make_diffusers_vae(cfg: VAEDecoderConfig, ours: VAEEncoder):
    from diffusers import AutoencoderKL
    from diffusers.models.attention_processor import AttnProcessor

    levels = len(cfg.ch_mult)
    assert cfg.z_channels == cfg.embed_dim   # diffusers' quant_conv is 2*latent -> 2*latent
    # Built on the meta device (the decoder half, never run, costs no init time); the encoder's
    # tensors are assigned from ours.
    with torch.device("meta"):
        vae = AutoencoderKL(in_channels=cfg.out_ch, out_channels=cfg.out_ch,
                            down_block_types=["DownEncoderBlock2D"] * levels, up_block_types=["UpDecoderBlock2D"] * levels,
                            block_out_channels=[cfg.ch * m for m in cfg.ch_mult], layers_per_block=cfg.num_res_blocks,
                            latent_channels=cfg.z_channels, norm_num_groups=cfg.num_groups,
                            scaling_factor=cfg.scale_factor).eval()
    vae.set_attn_processor(AttnProcessor())      # explicit baddbmm + softmax, not our SDPA
    missing, unexpected = vae.load_state_dict(encoder_to_diffusers(ours.state_dict(), cfg), strict=False, assign=True)
    assert not unexpected, unexpected
    assert all(k.startswith(("decoder.", "post_quant_conv.")) for k in missing), "encoder-side keys left unmapped"
    return vae


@pytest.mark.parametrize("cfg,hw", [(TINY, (33, 47)), (TINY, (64, 48)), (V1, (40, 56))],
                         ids=["tiny-33x47", "tiny-64x48", "v1-40x56"])
@torch.no_grad()
def test_moments_match_diffusers(cfg, hw):
    """mean and log-variance against AutoencoderKL.encode(x).latent_dist. Odd sides check the
    bottom/right-only padding of the strided convs (symmetric padding shifts every latent); the
    v1 structure (ch 128, mult 1-2-4-4, 2 res blocks) runs at a small non-square image."""
    diffusers()
    ours = make_encoder(cfg)
    theirs = make_diffusers_vae(cfg, ours)
    x = torch.rand(2, cfg.out_ch, *hw, generator=torch.Generator().manual_seed(1)) * 2 - 1
    moments = ours.moments(x)
    dist = theirs.encode(x).latent_dist
    assert moments.shape[1] == 2 * cfg.embed_dim
    mean, logvar = moments.chunk(2, dim=1)
    assert_matches(f"vae_encoder[{hw}].mean", mean, dist.mean)
    # diffusers clamps logvar to [-30, 20] like the original; random weights stay far inside it
    assert logvar.abs().max() < 20
    assert_matches(f"vae_encoder[{hw}].logvar", logvar, dist.logvar)


@torch.no_grad()
def test_sample_matches_diffusers_latent_dist():
    """sample(moments, noise) = (mean + exp(clamp(logvar)/2) * noise) * scale_factor against
    DiagonalGaussianDistribution(moments).sample(generator) * scaling_factor, the diffusers
    pipeline's image latent: the same CPU generator gives the same noise. The log-variances
    cover both clamp bounds."""
    diffusers()
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    ours = VAEEncoder(TINY)
    g = torch.Generator().manual_seed(3)
    mean = torch.randn(2, TINY.embed_dim, 5, 7, generator=g)
    logvar = torch.empty_like(mean).uniform_(-45, 35, generator=g)
    assert (logvar < -30).any() and (logvar > 20).any()
    moments = torch.cat([mean, logvar], dim=1)
    noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(7))
    want = DiagonalGaussianDistribution(moments).sample(generator=torch.Generator().manual_seed(7)) * TINY.scale_factor
    assert_matches("vae_encoder.sample", ours.sample(moments, noise), want, rtol=1e-6)


# --------------------------------------------------------------------------------------------
# layout and the hand-written formula (no oracle needed)

def test_sample_formula_and_shape_check():
    ours = VAEEncoder(TINY)
    moments = torch.tensor([1.0, -2.0, 25.0, -50.0]).view(1, 4, 1, 1).repeat(1, 2, 1, 1)  # 8 channels
    noise = torch.full((1, 4, 1, 1), 0.5)
    mean, logvar = moments.chunk(2, dim=1)
    want = (mean + torch.exp(0.5 * logvar.clamp(-30, 20)) * noise) * 0.18215
    torch.testing.assert_close(ours.sample(moments, noise), want, rtol=0, atol=0)
    with pytest.raises(ValueError, match="mean's shape"):
        ours.sample(moments, torch.zeros(1, 4, 2, 1))


def test_original_layout_loads_strictly():
    """random_original writes autoencoder_kl.pth's encoder.* / quant_conv.* names; in a whole
    autoencoder state dict (decoder included) original_state_dict keeps exactly those, and they
    load strictly. The v1 shapes are checked on the meta device (no memory)."""
    g = torch.Generator().manual_seed(0)
    full = {**VAEDecoder(TINY).state_dict(), **random_original(TINY, g)}
    enc = original_state_dict(full)
    assert enc and all(k.startswith(KEY_PREFIXES) for k in enc)
    assert not any(k.startswith(KEY_PREFIXES) for k in set(full) - set(enc))
    VAEEncoder(TINY).load_state_dict(enc, strict=True)
    with torch.device("meta"):
        v1 = VAEEncoder(V1).state_dict()
    assert v1["encoder.conv_in.weight"].shape == (128, 3, 3, 3)
    assert v1["encoder.down.3.block.1.conv2.weight"].shape == (512, 512, 3, 3)
    assert "encoder.down.3.downsample.conv.weight" not in v1 and "encoder.down.2.downsample.conv.weight" in v1
    assert v1["encoder.conv_out.weight"].shape == (8, 512, 3, 3)
    assert v1["quant_conv.weight"].shape == (8, 8, 1, 1)
    assert sum(1 for k in v1 if ".block." in k and k.endswith("nin_shortcut.weight")) == 2   # 128->256, 256->512


def test_random_weights_are_healthy():
    """Activations neither vanish nor explode through the v1-depth encoder (random stand-ins are
    used by the pipeline tests)."""
    cfg = dataclasses.replace(TINY, ch_mult=(1, 2, 4, 4), num_res_blocks=2)
    enc = make_encoder(cfg)
    with torch.no_grad():
        m = enc.moments(torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1)
    assert 0.1 < m.std().item() < 10, m.std()


# --------------------------------------------------------------------------------------------
# GPU


@pytest.fixture
def real_fp32():
    """The fp32 references on CUDA without TF32 (cuDNN's convolutions default to it)."""
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags

@pytest.mark.gpu
@pytest.mark.parametrize("fused", [False, True], ids=["torch-groupnorm", "plugin-groupnorm"])
@torch.no_grad()
def test_fp16_cuda_matches_fp32(fused, real_fp32):
    """v1 structure at 256 x 256 on CUDA: fp16 (optionally with the plugin's fused GroupNorm,
    as the decoder's fast path) against fp32. Reports rel / max-abs error of the moments and of
    the sampled latent."""
    from models import groupnorm
    from models.vae_decoder import GroupNorm

    if fused and not groupnorm.available():
        pytest.skip("the GroupNorm plugin is not built (plugin/)")
    ref = make_encoder(V1).cuda()
    half = make_encoder(V1).cuda().half()
    for m in half.modules():
        if isinstance(m, GroupNorm):
            m.fused = fused
    x = torch.rand(2, 3, 256, 256, generator=torch.Generator().manual_seed(1)) * 2 - 1
    want = ref.moments(x.cuda())
    got = half.moments(x.cuda().half()).float()
    assert torch.isfinite(got).all()
    noise = torch.randn(want[:, :4].shape, generator=torch.Generator().manual_seed(2)).cuda()
    for name, a, b in (("moments", got, want), ("latent", half.sample(got.half(), noise).float(), ref.sample(want, noise))):
        print(f"vae_encoder fp16 {name}: rel_err={rel_err(a, b):.3e} max_abs={(a - b).abs().max().item():.3e}")
        assert rel_err(a, b) < 1e-2
