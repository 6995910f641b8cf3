"""TensorRT-LLM engines against the PyTorch reference (fp32), per component and end to end.

Two halves. The reference half (the tiny-preset model folder, the inputs the engines are fed,
the fp32 torch outputs they are compared with) needs neither TensorRT nor a GPU: it runs in CI
on the CPU, so the harness cannot rot. The engine half builds tiny engines (random weights) in
a temporary folder with the real build scripts and compares; it needs tensorrt_llm and a CUDA
device (the Docker image, docs/engines.md) and is skipped otherwise, with that reason.
fp16 tolerances, relative to the output's RMS: text encoder 1e-2, UViT 2e-2, VAE decoder 2e-2;
end to end: mean |pixel difference| <= 2 (of 255) over the image.

The tiny preset's UViT has head size 16, which TensorRT-LLM's fused attention does not cover, so
its engine runs attention on plain ops. A second model folder, preset tiny-fmha (UViT embed_dim
128, 2 heads: head size 64, as v1), builds the UViT through the bert_attention plugin (context
FMHA) and its CUDA-graph capture, compared with the same reference the same way.
"""
import importlib.util
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from models.config import PRESETS
from models.trtllm.fmha import use_fused_attention
from unidiffuser.weights import folders
from unidiffuser.backends.torch_backend import TorchBackend
from unidiffuser.pipeline import Request, Pipeline
from unidiffuser.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
PLUGIN = ROOT / "plugin" / "build" / "libunidiffuser_plugins.so"
MAX_IMAGES = 2          # --max-batch-size of the test engines: the UViT engine holds 2x rows
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
PROMPT, SEED, STEPS = "an elephant under the sea", 7, 8
FMHA_PRESET = "tiny-fmha"   # UViT head size 64: the fused-attention engine path

if importlib.util.find_spec("tensorrt_llm") is None:
    NO_ENGINES = "tensorrt_llm is not installed (build and run engines inside the Docker image, docs/engines.md)"
elif not torch.cuda.is_available():
    NO_ENGINES = "TensorRT-LLM engines need a CUDA device"
else:
    NO_ENGINES = None


def rel_err(a, b):
    a, b = a.float().cpu(), b.float().cpu()
    return ((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt().clamp_min(1e-6)).item()


def run_script(*args):
    r = subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


# --- inputs (drawn on the CPU from fixed seeds, so both halves see the same numbers) ---------------

def text_ids(cfg):
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, cfg.text_encoder.vocab_size, (MAX_IMAGES, 77), generator=g).to(DEVICE)


def uvit_inputs(cfg, images):
    """One CFG call: conditional rows (t_text 0) then unconditional rows (t_text 1000)."""
    u, n = cfg.uvit, 2 * images
    g = torch.Generator().manual_seed(images)
    z = torch.randn(n, u.in_chans, u.img_size, u.img_size, generator=g)
    clip = torch.randn(n, 1, u.clip_img_dim, generator=g)
    text = torch.randn(n, 77, u.text_dim, generator=g)
    t_img = torch.full((n,), 517.3)
    t_text = torch.tensor([0.0] * images + [1000.0] * images)
    data_type = torch.ones(n, dtype=torch.long)
    return [x.to(DEVICE) for x in (z, clip, text, t_img, t_text, data_type)]


def latents(cfg):
    g = torch.Generator().manual_seed(1)
    return torch.randn(MAX_IMAGES, 4, cfg.uvit.img_size, cfg.uvit.img_size, generator=g).to(DEVICE)


def generate(backend, cfg, model):
    req = Request([PROMPT], [SEED], steps=STEPS, height=cfg.default_size, width=cfg.default_size)
    return Pipeline(backend, cfg, Tokenizer(model / "tokenizer"))(req).images


def converted(tmp_path_factory, preset):
    out = tmp_path_factory.mktemp("engines") / "model"
    run_script("convert_weights.py", "--random", preset, "--out", out, "--trtllm")
    return out


def torch_reference(model):
    cfg, manifest = folders.read_manifest(model)
    return cfg, TorchBackend.load(model, cfg, manifest, DEVICE, torch.float32)


def built_engines(model):
    """The three engines of `model`, built by the build scripts, in a TrtllmBackend."""
    if NO_ENGINES:
        pytest.skip(NO_ENGINES)
    from unidiffuser.backends.trtllm import TrtllmBackend
    n = str(MAX_IMAGES)
    run_script("build_clip.py", "--model-dir", model, "--max-batch-size", n)
    run_script("build_uvit.py", "--model-dir", model, "--max-batch-size", n)
    run_script("build_decoder.py", "--model-dir", model, "--max-batch-size", n,
               *(["--plugin-lib", PLUGIN] if PLUGIN.is_file() else []))
    cfg, manifest = folders.read_manifest(model)
    return TrtllmBackend(model, cfg, manifest, torch.device("cuda"), torch.float16)


def graphs_of(engine):
    from unidiffuser.backends.trtllm import _Graph
    return [g for g in engine.graphs.values() if isinstance(g, _Graph)]


# --- fixtures ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return converted(tmp_path_factory, "tiny")


@pytest.fixture(scope="module")
def reference(model):
    return torch_reference(model)


@pytest.fixture(scope="module")
def engines(model):
    return built_engines(model)


@pytest.fixture(scope="module")
def fmha_model(tmp_path_factory):
    return converted(tmp_path_factory, FMHA_PRESET)


@pytest.fixture(scope="module")
def fmha_reference(fmha_model):
    return torch_reference(fmha_model)


@pytest.fixture(scope="module")
def fmha_engines(fmha_model):
    return built_engines(fmha_model)


# --- the reference half (any machine) ------------------------------------------------------------

def test_rel_err():
    x = torch.randn(100, generator=torch.Generator().manual_seed(0))
    assert rel_err(x, x) == 0
    assert rel_err(1.1 * x, x) == pytest.approx(0.1, rel=1e-4)


def test_reference_text_encoder(reference):
    cfg, ref = reference
    ids = text_ids(cfg)
    out = ref.encode_text(ids)
    assert out.shape == (MAX_IMAGES, 77, cfg.uvit.text_dim) and out.dtype == torch.float32
    assert torch.isfinite(out).all() and torch.equal(out, ref.encode_text(ids))


@pytest.mark.parametrize("images", [1, MAX_IMAGES])
def test_reference_uvit(reference, images):
    cfg, ref = reference
    z, clip, text, t_img, t_text, dt = uvit_inputs(cfg, images)
    z_out, clip_out, _ = ref.uvit(z, clip, text, t_img, t_text, dt)
    assert z_out.shape == z.shape and clip_out.shape == clip.shape
    assert torch.isfinite(z_out).all() and torch.isfinite(clip_out).all()
    # Rows differing only in t_text give different outputs: the inputs exercise both CFG halves.
    z, clip, text = (torch.cat([x[:images], x[:images]]) for x in (z, clip, text))
    z_out, _, _ = ref.uvit(z, clip, text, t_img, t_text, dt)
    assert rel_err(z_out[images:], z_out[:images]) > 1e-3


def test_reference_vae_decoder(reference):
    cfg, ref = reference
    z = latents(cfg)
    img = ref.decode(z)
    f = cfg.vae_decoder.downsample
    assert img.shape == (MAX_IMAGES, 3, f * z.shape[2], f * z.shape[3]) and torch.isfinite(img).all()


def test_fmha_preset_takes_the_fused_attention_path():
    """build_uvit.py takes the bert_attention plugin for tiny-fmha (and v1), plain ops for tiny."""
    u = PRESETS[FMHA_PRESET].uvit
    assert u.embed_dim // u.num_heads == 64 == PRESETS["v1"].uvit.embed_dim // PRESETS["v1"].uvit.num_heads
    assert use_fused_attention(u) and use_fused_attention(PRESETS["v1"].uvit)
    assert not use_fused_attention(PRESETS["tiny"].uvit)
    # Only the UViT differs: the other two engines are tiny's.
    assert PRESETS[FMHA_PRESET].text_encoder == PRESETS["tiny"].text_encoder
    assert PRESETS[FMHA_PRESET].vae_decoder == PRESETS["tiny"].vae_decoder


@pytest.mark.parametrize("images", [1, MAX_IMAGES])
def test_reference_uvit_fmha(fmha_reference, images):
    cfg, ref = fmha_reference
    z, clip, text, t_img, t_text, dt = uvit_inputs(cfg, images)
    z_out, clip_out, _ = ref.uvit(z, clip, text, t_img, t_text, dt)
    assert z_out.shape == z.shape and clip_out.shape == clip.shape
    assert torch.isfinite(z_out).all() and torch.isfinite(clip_out).all() and z_out.std() > 0


def test_reference_end_to_end(model, reference):
    cfg, ref = reference
    a, b = generate(ref, cfg, model), generate(ref, cfg, model)
    assert a.shape == (1, cfg.default_size, cfg.default_size, 3) and a.dtype == torch.uint8
    assert torch.equal(a, b)                      # the comparison target is reproducible
    assert a.float().std() > 0


# --- the engine half (tensorrt_llm + CUDA) -------------------------------------------------------

@pytest.mark.trtllm
def test_text_encoder(reference, engines):
    cfg, ref = reference
    ids = text_ids(cfg)
    assert rel_err(engines.encode_text(ids), ref.encode_text(ids)) < 1e-2


@pytest.mark.trtllm
@pytest.mark.parametrize("images", [1, MAX_IMAGES])
def test_uvit(reference, engines, images):
    cfg, ref = reference
    z, clip, text, t_img, t_text, dt = uvit_inputs(cfg, images)
    for _ in range(3):            # capture + checked first replay, then a plain replay
        out = engines.uvit(z.half(), clip.half(), text.half(), t_img, t_text, dt)
    want = ref.uvit(z, clip, text, t_img, t_text, dt)
    assert rel_err(out[0], want[0]) < 2e-2 and rel_err(out[1], want[1]) < 2e-2


@pytest.mark.trtllm
def test_uvit_one_context_per_captured_shape(reference, engines):
    cfg, _ = reference
    for images in (1, MAX_IMAGES):
        z, clip, text, t_img, t_text, dt = uvit_inputs(cfg, images)
        engines.uvit(z.half(), clip.half(), text.half(), t_img, t_text, dt)
    graphs = graphs_of(engines.engines["uvit"])
    assert len(graphs) == 2 and all(g.verified for g in graphs)
    session = engines.engines["uvit"].session
    assert graphs[0].context is not graphs[1].context
    assert session.context not in (graphs[0].context, graphs[1].context)


@pytest.mark.trtllm
def test_uvit_failed_enqueue_in_capture_falls_back_to_eager(reference, engines, monkeypatch, caplog):
    from unidiffuser.backends import trtllm as trtllm_backend
    cfg, ref = reference
    engine = engines.engines["uvit"]
    monkeypatch.setattr(engine, "graphs", {})
    real_run = engine.session.run
    # Fail only the per-shape contexts' enqueues (warm-up/capture); eager runs use the default one.
    monkeypatch.setattr(engine.session, "run", lambda i, o, s, context=None: context is None and real_run(i, o, s))
    z, clip, text, t_img, t_text, dt = uvit_inputs(cfg, 1)
    with caplog.at_level(logging.WARNING, logger="unidiffuser"):
        out = engines.uvit(z.half(), clip.half(), text.half(), t_img, t_text, dt)
    assert "running without graphs" in caplog.text
    assert list(engine.graphs.values()) == [trtllm_backend._EAGER]
    assert rel_err(out[0], ref.uvit(z, clip, text, t_img, t_text, dt)[0]) < 2e-2


@pytest.mark.trtllm
def test_uvit_replay_mismatch_falls_back_to_eager(reference, engines, monkeypatch, caplog):
    from unidiffuser.backends import trtllm as trtllm_backend
    cfg, _ = reference
    engine = engines.engines["uvit"]
    monkeypatch.setattr(engine, "graphs", {})
    monkeypatch.setattr(trtllm_backend, "replay_matches", lambda *a, **k: False)
    z, clip, text, t_img, t_text, dt = uvit_inputs(cfg, 1)
    with caplog.at_level(logging.WARNING, logger="unidiffuser"):
        engines.uvit(z.half(), clip.half(), text.half(), t_img, t_text, dt)
    assert "differs from an eager run" in caplog.text
    assert list(engine.graphs.values()) == [trtllm_backend._EAGER]


@pytest.mark.trtllm
def test_uvit_tiny_engine_is_plain(engines):
    assert engines.configs["uvit"]["plugins"] == {"attention": "plain"}


@pytest.mark.trtllm
def test_uvit_fmha_engine_is_built_with_the_plugin(fmha_engines):
    plugins = fmha_engines.configs["uvit"]["plugins"]
    assert plugins["attention"] == "bert_attention plugin"
    assert plugins["fmha_accumulation"] in ("float32", "float16")


@pytest.mark.trtllm
@pytest.mark.parametrize("images", [1, MAX_IMAGES])
def test_uvit_fmha(fmha_reference, fmha_engines, images):
    """The fused attention, eager (the checked first replay) and replayed from its CUDA graph."""
    cfg, ref = fmha_reference
    engine = fmha_engines.engines["uvit"]
    z, clip, text, t_img, t_text, dt = uvit_inputs(cfg, images)
    want = ref.uvit(z, clip, text, t_img, t_text, dt)
    for _ in range(3):            # capture + checked first replay, then plain replays
        out = fmha_engines.uvit(z.half(), clip.half(), text.half(), t_img, t_text, dt)
        assert rel_err(out[0], want[0]) < 2e-2 and rel_err(out[1], want[1]) < 2e-2
    eager = engine({"img": z.half(), "clip_img": clip.half(), "text": text.half(), "t_img": t_img.float(),
                    "t_text": t_text.float(), "data_type": dt.to(torch.int32)})
    assert rel_err(eager["img_out"], want[0]) < 2e-2
    from unidiffuser.backends.trtllm import _EAGER
    assert _EAGER not in engine.graphs.values()          # captured, and the replay matched eager
    assert all(g.verified for g in graphs_of(engine))


@pytest.mark.trtllm
def test_uvit_fmha_one_graph_per_shape(fmha_reference, fmha_engines):
    cfg, _ = fmha_reference
    for images in (1, MAX_IMAGES):
        z, clip, text, t_img, t_text, dt = uvit_inputs(cfg, images)
        fmha_engines.uvit(z.half(), clip.half(), text.half(), t_img, t_text, dt)
    graphs = graphs_of(fmha_engines.engines["uvit"])
    assert len(graphs) == 2 and all(g.verified for g in graphs)
    assert graphs[0].context is not graphs[1].context


@pytest.mark.trtllm
def test_end_to_end_fmha(fmha_model, fmha_reference, fmha_engines):
    cfg, ref = fmha_reference
    a, b = generate(ref, cfg, fmha_model).float(), generate(fmha_engines, cfg, fmha_model).float()
    assert (a - b).abs().mean().item() <= 2.0


@pytest.mark.trtllm
def test_vae_decoder(reference, engines):
    cfg, ref = reference
    z = latents(cfg)
    assert rel_err(engines.decode(z.half()), ref.decode(z)) < 2e-2


@pytest.mark.trtllm
def test_end_to_end(model, reference, engines):
    cfg, ref = reference
    a, b = generate(ref, cfg, model).float(), generate(engines, cfg, model).float()
    assert (a - b).abs().mean().item() <= 2.0


@pytest.mark.trtllm
def test_wrong_size_and_batch_errors(reference, engines):
    from unidiffuser.backends.engine_folder import EngineError
    cfg, _ = reference
    u, n = cfg.uvit, 2 * MAX_IMAGES + 2
    z = torch.zeros(n, 4, u.img_size, u.img_size, device="cuda", dtype=torch.half)
    with pytest.raises(EngineError, match=f"build_uvit.py --max-batch-size {MAX_IMAGES + 1}"):
        engines.uvit(z, z.new_zeros(n, 1, u.clip_img_dim), z.new_zeros(n, 77, u.text_dim),
                     torch.zeros(n, device="cuda"), torch.zeros(n, device="cuda"),
                     torch.ones(n, dtype=torch.long, device="cuda"))
    with pytest.raises(EngineError, match="build_decoder.py --height"):
        engines.decode(torch.zeros(1, 4, 2 * u.img_size, u.img_size, device="cuda", dtype=torch.half))
