"""TensorRT-LLM engines against the PyTorch reference (fp32), per component and end to end.

Needs tensorrt_llm and a CUDA device (the Docker image, docs/engines.md); skipped otherwise.
Builds tiny-preset engines (random weights) in a temporary folder with the real build scripts.
fp16 tolerances, relative to the output's RMS: text encoder 1e-2, UViT 2e-2, VAE decoder 2e-2;
end to end: mean |pixel difference| <= 2 (of 255) over the image.
"""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

trtllm = pytest.importorskip("tensorrt_llm", reason="tensorrt_llm is not installed (build/run inside the Docker image)")
pytestmark = [pytest.mark.trtllm,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

ROOT = Path(__file__).resolve().parents[1]
PLUGIN = ROOT / "plugin" / "build" / "libunidiffuser_plugins.so"


def rel_err(a, b):
    a, b = a.float().cpu(), b.float().cpu()
    return ((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt().clamp_min(1e-6)).item()


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    model = tmp_path_factory.mktemp("engines") / "model"
    def run(*a):
        r = subprocess.run([sys.executable, *map(str, a)], cwd=ROOT, capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr
    run("convert_weights.py", "--random", "tiny", "--out", model, "--trtllm")
    run("build_clip.py", "--model-dir", model, "--max-batch-size", "2")
    run("build_uvit.py", "--model-dir", model, "--max-batch-size", "2")
    run("build_decoder.py", "--model-dir", model, "--max-batch-size", "2",
        *(["--plugin-lib", PLUGIN] if PLUGIN.is_file() else []))
    from unidiffuser import checkpoints
    from unidiffuser.pipeline import TorchBackend
    from unidiffuser.trtllm_backend import TrtllmBackend
    cfg, manifest = checkpoints.read_manifest(model)
    dev = torch.device("cuda")
    return (model, cfg, TorchBackend(model, cfg, manifest, dev, torch.float32),
            TrtllmBackend(model, cfg, manifest, dev, torch.float16))


def test_text_encoder(built):
    _, cfg, ref, eng = built
    ids = torch.randint(0, cfg.text_encoder.vocab_size, (2, 77), device="cuda")
    assert rel_err(eng.encode_text(ids), ref.encode_text(ids)) < 1e-2


@pytest.mark.parametrize("images", [1, 2])
def test_uvit(built, images):
    _, cfg, ref, eng = built
    u, n = cfg.uvit, 2 * images
    g = torch.Generator(device="cuda").manual_seed(0)
    z = torch.randn(n, u.in_chans, u.img_size, u.img_size, device="cuda", generator=g)
    clip = torch.randn(n, 1, u.clip_img_dim, device="cuda", generator=g)
    text = torch.randn(n, 77, u.text_dim, device="cuda", generator=g)
    t_img = torch.full((n,), 517.3, device="cuda")
    t_text = torch.tensor([0.0] * images + [1000.0] * images, device="cuda")
    dt = torch.ones(n, dtype=torch.long, device="cuda")
    for _ in range(2):            # the second call replays the CUDA graph
        out = eng.uvit(z.half(), clip.half(), text.half(), t_img, t_text, dt)
    want = ref.uvit(z, clip, text, t_img, t_text, dt)
    assert rel_err(out[0], want[0]) < 2e-2 and rel_err(out[1], want[1]) < 2e-2


def test_vae_decoder(built):
    _, cfg, ref, eng = built
    z = torch.randn(2, 4, cfg.uvit.img_size, cfg.uvit.img_size, device="cuda")
    assert rel_err(eng.decode(z.half()), ref.decode(z)) < 2e-2


def test_end_to_end(built):
    from unidiffuser.pipeline import Request, Text2Image
    from unidiffuser.tokenizer import Tokenizer
    model, cfg, ref, eng = built
    tok = Tokenizer(model / "tokenizer")
    req = Request(["an elephant under the sea"], [7], steps=8, height=cfg.default_size, width=cfg.default_size)
    a = Text2Image(ref, cfg, tok)(req).images.float()
    b = Text2Image(eng, cfg, tok)(req).images.float()
    assert (a - b).abs().mean().item() <= 2.0


def test_wrong_size_and_batch_errors(built):
    from unidiffuser.engine_build import EngineError
    _, cfg, _, eng = built
    u = cfg.uvit
    z = torch.zeros(6, 4, u.img_size, u.img_size, device="cuda", dtype=torch.half)
    with pytest.raises(EngineError, match="build_uvit.py --max-batch-size 3"):
        eng.uvit(z, z.new_zeros(6, 1, u.clip_img_dim), z.new_zeros(6, 77, u.text_dim),
                 torch.zeros(6, device="cuda"), torch.zeros(6, device="cuda"), torch.ones(6, dtype=torch.long, device="cuda"))
    with pytest.raises(EngineError, match="build_decoder.py --height"):
        eng.decode(torch.zeros(1, 4, 2 * u.img_size, u.img_size, device="cuda", dtype=torch.half))
