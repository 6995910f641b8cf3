"""models/image_encoder.py: the CLIP ViT-B/32 image tower against transformers'
CLIPVisionModelWithProjection (eager attention) and against OpenAI's own CLIP model code (the
`clip` package the original imports), on identical random weights, fp32 on the CPU; the
preprocessing against transformers' CLIP image processor (PIL backend) with the
clip-vit-base-patch32 settings, and against torchvision's transform where torchvision exists.
The GPU test compares fp16 with fp32 on CUDA.
"""
from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models.config import PRESETS, ImageEncoderConfig
from models.image_encoder import MEAN, STD, ImageEncoder, original_state_dict, preprocess, random_original

RTOL = 1e-5
TINY = PRESETS["tiny"].image_encoder
V1 = PRESETS["v1"].image_encoder


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


def make_encoder(cfg: ImageEncoderConfig, seed: int = 0) -> ImageEncoder:
    enc = ImageEncoder(cfg).eval()
    enc.load_state_dict(random_original(cfg, torch.Generator().manual_seed(seed)), strict=True)
    return enc


def pixels(n: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 224, 224, generator=torch.Generator().manual_seed(seed))


def hf_config(cfg: ImageEncoderConfig):
    from transformers import CLIPVisionConfig

    c = CLIPVisionConfig(**dataclasses.asdict(cfg))
    c._attn_implementation = "eager"
    return c


# --------------------------------------------------------------------------------------------
# the network

def test_v1_config_is_clip_vit_base_patch32():
    """ImageEncoderConfig() holds openai/clip-vit-base-patch32's vision fields, which are
    transformers' CLIPVisionConfig defaults."""
    from transformers import CLIPVisionConfig

    ref = CLIPVisionConfig()
    for f in dataclasses.fields(ImageEncoderConfig):
        assert getattr(V1, f.name) == getattr(ref, f.name), f.name


def test_v1_names_and_shapes_are_transformers():
    """Every tensor name and shape of the v1 network equals CLIPVisionModelWithProjection's
    (persistent state; both built on the meta device), so the hub file's vision part loads."""
    from transformers import CLIPVisionModelWithProjection

    with torch.device("meta"):
        ours = {k: tuple(v.shape) for k, v in ImageEncoder(V1).state_dict().items()}
        theirs = {k: tuple(v.shape) for k, v in CLIPVisionModelWithProjection(hf_config(V1)).state_dict().items()
                  if not k.endswith("position_ids")}
    assert ours == theirs


@torch.no_grad()
def test_matches_transformers_clip_vision_with_projection():
    """image_embeds of CLIPVisionModelWithProjection (eager attention), loaded strictly from our
    state dict."""
    from transformers import CLIPVisionModelWithProjection

    ours = make_encoder(TINY)
    oracle = CLIPVisionModelWithProjection(hf_config(TINY)).eval()
    missing, unexpected = oracle.load_state_dict(ours.state_dict(), strict=False)
    assert not unexpected and all(k.endswith("position_ids") for k in missing), (missing, unexpected)
    x = pixels()
    assert_matches("image_encoder.vs_transformers", ours(x), oracle(pixel_values=x).image_embeds)


def openai_clip_model_module():
    """OpenAI's clip/model.py, loaded by file: the package's __init__ needs torchvision, which
    the model code does not."""
    spec = importlib.util.find_spec("clip")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("OpenAI's CLIP package (openai-clip, installed by setup.sh) is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / "model.py"
    mod_spec = importlib.util.spec_from_file_location("openai_clip_model", path)
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    return module


def to_openai(ours: dict[str, torch.Tensor], cfg: ImageEncoderConfig) -> dict[str, torch.Tensor]:
    """transformers names -> OpenAI's VisionTransformer (the conversion transformers' CLIP
    script inverts): q/k/v stacked into in_proj, fc1/fc2 -> c_fc/c_proj, projection transposed."""
    p = "vision_model."
    out = {
        "conv1.weight": ours[p + "embeddings.patch_embedding.weight"],
        "class_embedding": ours[p + "embeddings.class_embedding"],
        "positional_embedding": ours[p + "embeddings.position_embedding.weight"],
        "proj": ours["visual_projection.weight"].T,
    }
    for a, b in (("ln_pre", "pre_layrnorm"), ("ln_post", "post_layernorm")):
        for s in ("weight", "bias"):
            out[f"{a}.{s}"] = ours[f"{p}{b}.{s}"]
    for i in range(cfg.num_hidden_layers):
        src, dst = f"{p}encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for s in ("weight", "bias"):
            out[f"{dst}attn.in_proj_{s}"] = torch.cat([ours[f"{src}self_attn.{n}_proj.{s}"] for n in "qkv"])
            for a, b in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"),
                         ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
                out[f"{dst}{a}.{s}"] = ours[f"{src}{b}.{s}"]
    return {k: v.clone() for k, v in out.items()}


@torch.no_grad()
def test_matches_openai_clip_encode_image():
    """OpenAI's VisionTransformer (what the original's `encode_image` runs: nn.MultiheadAttention,
    QuickGELU, ln_post on the class token, @ proj), loaded strictly with our weights mapped to
    its names."""
    clip_model = openai_clip_model_module()
    cfg = dataclasses.replace(TINY, intermediate_size=4 * TINY.hidden_size)   # OpenAI's MLP is always 4x
    ours = make_encoder(cfg)
    vit = clip_model.VisionTransformer(input_resolution=cfg.image_size, patch_size=cfg.patch_size,
                                       width=cfg.hidden_size, layers=cfg.num_hidden_layers,
                                       heads=cfg.num_attention_heads, output_dim=cfg.projection_dim).eval()
    vit.load_state_dict(to_openai(ours.state_dict(), cfg), strict=True)
    x = pixels()
    assert_matches("image_encoder.vs_openai_clip", ours(x), vit(x))


def test_original_state_dict_takes_the_vision_part():
    """From a whole CLIPModel file: vision_model.* and visual_projection.weight, without the
    position_ids buffer older exports carry; the text tower and logit_scale stay out."""
    ours = random_original(TINY, torch.Generator().manual_seed(0))
    clip_file = {**ours, "vision_model.embeddings.position_ids": torch.arange(50)[None],
                 "text_model.embeddings.token_embedding.weight": torch.zeros(3, 2),
                 "text_projection.weight": torch.zeros(2, 2), "logit_scale": torch.tensor(2.6)}
    got = original_state_dict(clip_file)
    assert set(got) == set(ours)
    ImageEncoder(TINY).load_state_dict(got, strict=True)


def test_rejects_other_image_sizes():
    with pytest.raises(ValueError, match="224 x 224"):
        ImageEncoder(TINY)(torch.zeros(1, 3, 256, 256))


# --------------------------------------------------------------------------------------------
# preprocessing

def random_image(w: int, h: int, seed: int = 0) -> Image.Image:
    """Smooth content plus noise: bicubic resampling differences would show on both."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    smooth = np.stack([np.sin(xx / 13.0 + c) * np.cos(yy / 7.0 - c) for c in range(3)], -1) * 100 + 128
    img = np.clip(smooth + rng.normal(0, 30, (h, w, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(img, "RGB")


def hf_processor(**overrides):
    """transformers' CLIP image processor with clip-vit-base-patch32's preprocessor_config.json
    settings, on its PIL backend (the numpy/PIL one in 4.x; 5.x names it CLIPImageProcessorPil,
    and its default CLIPImageProcessor would use torchvision's tensor resize where installed)."""
    import transformers

    cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    settings = dict(do_resize=True, size={"shortest_edge": 224}, resample=3, do_center_crop=True,
                    crop_size={"height": 224, "width": 224}, do_rescale=True, rescale_factor=1 / 255,
                    do_normalize=True, image_mean=list(MEAN), image_std=list(STD), do_convert_rgb=True)
    return cls(**{**settings, **overrides})


def hf_pixels(images, **overrides) -> torch.Tensor:
    return torch.as_tensor(np.stack(hf_processor(**overrides)(images=images, return_tensors="np")["pixel_values"]))


# (w, h): the pipeline's case (the original centre-crops the input to 512 x 512 first), a
# portrait, a landscape needing no resize, odd sides; each one's crop excess (long side after the
# resize minus 224) is 0, 1 or 2 mod 4, where torchvision's and transformers' offsets agree.
AGREEING_SIZES = [(512, 512), (300, 400), (224, 226), (257, 300), (640, 481)]


@pytest.mark.parametrize("wh", AGREEING_SIZES, ids=lambda wh: f"{wh[0]}x{wh[1]}")
def test_preprocess_matches_transformers_processor(wh):
    """Same resize (PIL bicubic on uint8, output size int(224 * long / short)), crop, rescale and
    normalisation: equal up to fp32 rounding (transformers rescales in float64 then rounds)."""
    img = random_image(*wh)
    ours, theirs = preprocess([img]), hf_pixels([img])
    assert ours.shape == theirs.shape == (1, 3, 224, 224)
    err = (ours - theirs).abs().max().item()
    print(f"preprocess[{wh}]: max_abs={err:.2e}")
    assert err <= 1e-6


def test_preprocess_crop_offset_where_torchvision_and_transformers_differ():
    """Crop excess 3 mod 4 (here 227 wide, no resize): torchvision's CenterCrop (the original's)
    starts at round(3 / 2) = 2, transformers' at 3 // 2 = 1. Ours equals transformers' resized,
    uncropped image cut at torchvision's offset, and is one pixel off transformers' own crop."""
    img = random_image(227, 224)
    ours = preprocess([img])
    uncropped = hf_pixels([img], do_center_crop=False)
    assert uncropped.shape[-2:] == (224, 227)
    assert (ours - uncropped[..., 2:226]).abs().max() <= 1e-6
    assert (hf_pixels([img]) - uncropped[..., 1:225]).abs().max() <= 1e-6
    assert (ours - hf_pixels([img])).abs().max() > 0.1


def test_preprocess_matches_openai_transform_with_torchvision():
    """The original's transform itself (clip/clip.py _transform: Resize(224, BICUBIC),
    CenterCrop(224), RGB, ToTensor, Normalize) where torchvision is installed; includes the
    excess-3 crop that transformers does differently."""
    T = pytest.importorskip("torchvision.transforms", reason="torchvision is not a dependency of this project")
    tf = T.Compose([T.Resize(224, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(224),
                    lambda im: im.convert("RGB"), T.ToTensor(), T.Normalize(MEAN, STD)])
    for wh in AGREEING_SIZES + [(227, 224)]:
        img = random_image(*wh)
        torch.testing.assert_close(preprocess([img])[0], tf(img), rtol=0, atol=0)


def test_preprocess_batch_and_modes():
    """A batch keeps order; non-RGB inputs are converted after the crop, as OpenAI's transform."""
    a, b = random_image(300, 400, 1), random_image(512, 512, 2)
    batch = preprocess([a, b, a.convert("L")])
    assert batch.shape == (3, 3, 224, 224) and batch.dtype == torch.float32
    torch.testing.assert_close(batch[0], preprocess([a])[0], rtol=0, atol=0)
    torch.testing.assert_close(batch[1], preprocess([b])[0], rtol=0, atol=0)
    grey = batch[2]
    torch.testing.assert_close((grey[0] * STD[0] + MEAN[0]), (grey[1] * STD[1] + MEAN[1]), rtol=0, atol=1e-6)


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
@torch.no_grad()
def test_fp16_cuda_matches_fp32(real_fp32):
    """v1 size on CUDA: fp16 against fp32 embeddings (the original runs CLIP in fp16 on CUDA)."""
    ref = make_encoder(V1).cuda()
    half = make_encoder(V1).cuda().half()
    x = preprocess([random_image(512, 512, s) for s in range(4)]).cuda()
    want, got = ref(x), half(x.half()).float()
    err = rel_err(got, want)
    print(f"image_encoder fp16: rel_err={err:.3e} max_abs={(got - want).abs().max().item():.3e}")
    assert torch.isfinite(got).all() and err < 1e-2
