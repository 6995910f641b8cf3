"""End to end through the two commands users run, and every bad input they can give them:
a clear error naming the file or argument, exit code 2, nothing half-written."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def cli(script, *args):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], capture_output=True, text=True, env=env, cwd=ROOT)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Random tiny weights in the original layouts (SRC) and their conversion (MODEL)."""
    base = tmp_path_factory.mktemp("tiny")
    r = cli("convert_weights.py", "--random", "tiny", "--src", base / "src", "--out", base / "model")
    assert r.returncode == 0, r.stderr
    return base / "src", base / "model"


def copy_originals(src: Path, dst: Path) -> Path:
    import shutil
    shutil.copytree(src, dst)
    return dst


def test_end_to_end_writes_pngs_and_sidecars(converted, tmp_path):
    _, model = converted
    out = tmp_path / "O"
    r = cli("run.py", "--prompt", "a dog under the sea", "--prompt", "a red cube", "--n-samples", "2",
            "--model-dir", model, "--steps", "3", "--height", "128", "--width", "128", "--out", out)
    assert r.returncode == 0, r.stderr
    assert "RANDOM weights" in r.stderr
    # the fixture's folder is fp16 (convert_weights.py's default), run here in fp32
    assert r.stderr.count("not the fp32 reference") == 1 and "convert_weights.py --dtype fp32" in r.stderr
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) == 4
    for png in pngs:
        img = Image.open(png)
        assert img.size == (128, 128) and img.mode == "RGB"
        side = json.loads(png.with_suffix(".json").read_text())
        assert side["steps"] == 3 and side["scale"] == 7.0 and side["backend"] == "torch"
        assert side["dtype"] == "fp32" and side["device"] == "cpu" and side["random_weights"] is True
        assert side["weights_dtype"] == "fp16"
        assert set(side["time_per_stage_s"]) == {"encode_s", "sample_s", "decode_s"}
    seeds = sorted(json.loads(p.with_suffix(".json").read_text())["seed"] for p in pngs)
    assert seeds == [1234, 1235, 1236, 1237]


def test_seed_reproduces_and_non_square_sizes(converted, tmp_path):
    _, model = converted
    common = ["--model-dir", model, "--steps", "2", "--height", "64", "--width", "96", "--seed", "7"]
    a = cli("run.py", "--prompt", "x", *common, "--out", tmp_path / "a")
    b = cli("run.py", "--prompts-file", write(tmp_path / "p.txt", "x\n\n"), *common, "--out", tmp_path / "b")
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    ia, ib = (np.asarray(Image.open(next((tmp_path / d).glob("*.png")))) for d in ("a", "b"))
    assert ia.shape == (64, 96, 3)
    assert np.array_equal(ia, ib)
    assert len(np.unique(ia.reshape(-1, 3), axis=0)) > 100     # an actual picture, not a constant


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# -- bad input: run.py ---------------------------------------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["--height", "100"], "--height must be a positive multiple of 16"),
    (["--width", "0"], "--width must be a positive multiple of 16"),
    (["--steps", "0"], "--steps must be >= 1"),
    (["--n-samples", "0"], "--n-samples must be >= 1"),
])
def test_run_rejects_bad_arguments(converted, tmp_path, args, message):
    _, model = converted
    r = cli("run.py", "--prompt", "x", "--model-dir", model, "--out", tmp_path / "O", *args)
    assert r.returncode == 2 and message in r.stderr
    assert not list((tmp_path).rglob("*.png"))


def test_run_rejects_unwritable_output(converted, tmp_path):
    _, model = converted
    blocker = write(tmp_path / "file", "")
    r = cli("run.py", "--prompt", "x", "--model-dir", model, "--out", blocker / "sub")
    assert r.returncode == 2 and "--out" in r.stderr and "not a writable folder" in r.stderr


def test_run_without_prompt_or_model(tmp_path, converted):
    _, model = converted
    r = cli("run.py", "--model-dir", model, "--out", tmp_path)
    assert r.returncode == 2 and "--prompt" in r.stderr
    r = cli("run.py", "--prompt", "x", "--model-dir", tmp_path / "nowhere", "--out", tmp_path)
    assert r.returncode == 2 and "nowhere" in r.stderr and "convert_weights.py" in r.stderr


def test_run_detects_manifest_sha256_mismatch(converted, tmp_path):
    import shutil
    _, model = converted
    bad = tmp_path / "model"
    shutil.copytree(model, bad)
    data = bytearray((bad / "uvit.safetensors").read_bytes())
    data[-3] ^= 0xFF                                  # one flipped byte in the tensor data
    (bad / "uvit.safetensors").write_bytes(bytes(data))
    r = cli("run.py", "--prompt", "x", "--model-dir", bad, "--steps", "1", "--out", tmp_path / "O")
    assert r.returncode == 2 and "uvit.safetensors" in r.stderr and "sha256" in r.stderr
    assert not list((tmp_path / "O").glob("*.png"))


# -- bad input: convert_weights.py ---------------------------------------------------------------

def convert(src, out):
    return cli("convert_weights.py", "--preset", "tiny", "--src", src, "--out", out)


def test_convert_from_originals_round_trips(converted, tmp_path):
    src, model = converted
    r = cli("convert_weights.py", "--preset", "tiny", "--dtype", "fp32", "--src", src, "--out", tmp_path / "m32")
    assert r.returncode == 0, r.stderr
    manifest = json.loads((tmp_path / "m32" / "manifest.json").read_text())
    assert manifest["random_weights"] is True and manifest["dtype"] == "fp32"
    assert set(manifest["files"]) == {"text_encoder.safetensors", "uvit.safetensors", "vae_decoder.safetensors"}
    from safetensors.torch import load_file
    uvit = load_file(str(tmp_path / "m32" / "uvit.safetensors"))
    orig = torch.load(src / "uvit_v1.pth", weights_only=True)
    assert uvit.keys() == orig.keys() and all(torch.equal(uvit[k], orig[k]) for k in orig)
    fp16 = load_file(str(model / "uvit.safetensors"))
    assert all(v.dtype == torch.float16 for v in fp16.values())


def test_convert_missing_file(converted, tmp_path):
    src = copy_originals(converted[0], tmp_path / "src")
    (src / "uvit_v1.pth").unlink()
    r = convert(src, tmp_path / "out")
    assert r.returncode == 2 and "uvit_v1.pth" in r.stderr and "huggingface.co/thu-ml/unidiffuser-v1" in r.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_convert_unreadable_checkpoint(converted, tmp_path, damage):
    src = copy_originals(converted[0], tmp_path / "src")
    f = src / "autoencoder_kl.pth"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2] if damage == "truncate" else os.urandom(4096))
    r = convert(src, tmp_path / "out")
    assert r.returncode == 2 and "autoencoder_kl.pth" in r.stderr and "not a readable PyTorch checkpoint" in r.stderr
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ.get('EVIL_MARK', '/tmp/evil-mark')}",))


def test_convert_never_runs_pickled_code(converted, tmp_path, monkeypatch):
    src = copy_originals(converted[0], tmp_path / "src")
    mark = tmp_path / "pwned"
    monkeypatch.setenv("EVIL_MARK", str(mark))
    torch.save({"pos_embed": _Evil()}, src / "uvit_v1.pth")
    r = convert(src, tmp_path / "out")
    assert r.returncode == 2 and "uvit_v1.pth" in r.stderr
    assert not mark.exists()


def test_convert_v0_uvit_gets_a_clear_hint(converted, tmp_path):
    src = copy_originals(converted[0], tmp_path / "src")
    sd = torch.load(src / "uvit_v1.pth", weights_only=True)
    del sd["token_embedding.weight"], sd["pos_embed_token"]
    torch.save(sd, src / "uvit_v1.pth")
    r = convert(src, tmp_path / "out")
    assert r.returncode == 2 and "missing keys: " in r.stderr and "token_embedding.weight" in r.stderr
    assert "UniDiffuser-v0" in r.stderr


def test_convert_unexpected_key_and_wrong_shape(converted, tmp_path):
    src = copy_originals(converted[0], tmp_path / "src")
    sd = torch.load(src / "uvit_v1.pth", weights_only=True)
    sd["extra.weight"] = torch.zeros(1)
    sd["text_embed.weight"] = torch.zeros(3, 3)
    torch.save(sd, src / "uvit_v1.pth")
    r = convert(src, tmp_path / "out")
    assert r.returncode == 2 and "unexpected keys: extra.weight" in r.stderr
    assert "wrong shapes: text_embed.weight (3, 3)" in r.stderr


def test_convert_refuses_to_overwrite(converted, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    write(out / "keep.txt", "mine")
    r = convert(converted[0], out)
    assert r.returncode == 2 and "--overwrite" in r.stderr
    assert (out / "keep.txt").read_text() == "mine"


def test_convert_offline_download_says_where_files_go(tmp_path):
    env_r = subprocess.run(
        [sys.executable, str(ROOT / "convert_weights.py"), "--download", "--src", str(tmp_path / "orig"), "--out", str(tmp_path / "m")],
        capture_output=True, text=True, cwd=ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)})
    assert env_r.returncode == 2
    for name in ("uvit_v1.pth", "caption_decoder.pth", "autoencoder_kl.pth", "clip-vit-large-patch14"):
        assert name in env_r.stderr
    assert not (tmp_path / "m").exists()
