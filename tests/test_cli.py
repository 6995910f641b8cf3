"""End to end through the commands users run, and every bad input they can give them: a
clear error naming the file or argument, exit code 2, no traceback, nothing of the user's lost
or half-written (the overwrite tests plant a sentinel file and check it survives)."""
import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import child_env, copy_without_task_networks, input_images
import torch
from PIL import Image

from unidiffuser.tasks import TASKS

ROOT = Path(__file__).resolve().parents[1]


def cli(script, *args, cwd=ROOT, env=None):
    env = child_env(**(env or {}))
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=cwd)


def refused(r, *names):
    """Exit 2, one clear message naming each of `names`, no traceback."""
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    for name in names:
        assert name in r.stderr, (name, r.stderr)


def sentinel(folder: Path, name="keep.txt") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return write(folder / name, "the user's own file")


def survives(path: Path) -> bool:
    return path.is_file() and path.read_text() == "the user's own file"


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Random tiny weights in the original layouts (SRC) and their conversion (MODEL, with the
    TensorRT-LLM checkpoint folders for the build scripts)."""
    base = tmp_path_factory.mktemp("tiny")
    r = cli("convert_weights.py", "--random", "tiny", "--src", base / "src", "--out", base / "model", "--trtllm")
    assert r.returncode == 0, r.stderr
    return base / "src", base / "model"


def strict_json(path: Path):
    def no_constant(name):
        raise ValueError(f"{path}: non-strict JSON constant {name}")
    return json.loads(path.read_text(), parse_constant=no_constant)


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
        side = strict_json(png.with_suffix(".json"))
        assert side["png_sha256"] == hashlib.sha256(png.read_bytes()).hexdigest()
        assert side["steps"] == 3 and side["scale"] == 7.0 and side["backend"] == "torch"
        assert side["dtype"] == "fp32" and side["device"] == "cpu" and side["random_weights"] is True
        assert side["weights_dtype"] == "fp16"
        assert set(side["time_per_stage_s"]) == {"encode_s", "sample_s", "decode_s"}
    seeds = sorted(json.loads(p.with_suffix(".json").read_text())["seed"] for p in pngs)
    assert seeds == [1234, 1235, 1236, 1237]
    assert not list(out.glob(".*"))                  # no temporary files left


def test_seed_reproduces_and_prompts_file_bom_is_stripped(converted, tmp_path):
    _, model = converted
    common = ["--model-dir", model, "--steps", "2", "--height", "64", "--width", "96", "--seed", "7"]
    a = cli("run.py", "--prompt", "x", *common, "--out", tmp_path / "a")
    prompts = tmp_path / "p.txt"
    prompts.write_bytes("\ufeffx\r\n\n".encode("utf-8"))     # as a Windows editor saves it
    b = cli("run.py", "--prompts-file", prompts, *common, "--out", tmp_path / "b")
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    ia, ib = (np.asarray(Image.open(next((tmp_path / d).glob("*.png")))) for d in ("a", "b"))
    assert ia.shape == (64, 96, 3)
    assert np.array_equal(ia, ib)
    assert len(np.unique(ia.reshape(-1, 3), axis=0)) > 100     # an actual picture, not a constant
    assert strict_json(next((tmp_path / "b").glob("*.json")))["prompt"] == "x"


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# -- bad input: run.py (argument errors answer before the model folder is even read) --------

def run_x(model, tmp_path, *args):
    return cli("run.py", "--prompt", "x", "--model-dir", model, "--out", tmp_path / "O", *args)


@pytest.mark.parametrize("args, names", [
    (["--height", "100"], ["--height", "multiple of 16"]),
    (["--width", "0"], ["--width", "multiple of 16"]),
    (["--height", "100000"], ["--height", "at most 4096"]),
    (["--steps", "0"], ["--steps", "1..1000"]),
    (["--steps", "1000000"], ["--steps", "1..1000"]),
    (["--n-samples", "0"], ["--n-samples", "1..4096"]),
    (["--n-samples", "1000000000"], ["--n-samples", "1..4096"]),
    (["--scale", "nan"], ["--scale", "finite"]),
    (["--scale", "inf"], ["--scale", "finite"]),
    (["--scale=-inf"], ["--scale", "finite"]),
    (["--seed", str(2**64)], ["--seed", "2**64"]),
    (["--seed", "-1"], ["--seed", "2**64"]),
    (["--seed", str(2**64 - 1), "--n-samples", "2"], ["--seed", "2**64 - 2"]),   # seed + 1 overflows
    (["--device", "cuad"], ["--device", "cpu, cuda or cuda:N", "'cuad'"]),
    (["--device", "mps"], ["--device", "'mps'"]),
    (["--device", ""], ["--device", "''"]),
    (["--device", "meta"], ["--device", "'meta'"]),
    (["--device", "cuda:x"], ["--device", "'cuda:x'"]),
    (["--compile", "--device", "cpu"], ["--compile", "--device cuda"]),
    (["--compile", "--backend", "trtllm"], ["--compile", "--backend torch"]),
    (["--dtype", "fp8", "--device", "cpu"], ["--dtype fp8", "CUDA"]),
    (["--dtype", "fp8", "--backend", "trtllm"], ["--dtype fp8", "--backend torch"]),
    (["--engine-dir", "e"], ["--engine-dir", "--backend trtllm"]),
])
def test_run_rejects_bad_arguments(converted, tmp_path, args, names):
    r = run_x(converted[1], tmp_path, *args)
    refused(r, *names)
    assert not list(tmp_path.rglob("*.png"))


def test_run_device_cuda_without_cuda(converted, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present; the no-CUDA message cannot be shown")
    refused(run_x(converted[1], tmp_path, "--device", "cuda"), "--device cuda", "no CUDA device")


def test_run_device_index_out_of_range(converted, tmp_path):
    n = torch.cuda.device_count()
    refused(run_x(converted[1], tmp_path, "--device", f"cuda:{n}"), f"--device cuda:{n}")


def test_run_refuses_what_cannot_fit_before_loading(converted, tmp_path):
    r = run_x(converted[1], tmp_path, "--height", "4096", "--width", "4096", "--n-samples", "4096")
    refused(r, "--height 4096 --width 4096", "GiB", "What would fit")
    assert "RANDOM weights" not in r.stderr            # refused before the model was loaded


def test_memory_estimate_says_what_fits():
    from models.config import PRESETS
    from unidiffuser import memory
    cfg, gib = PRESETS["v1"], 2**30
    e = memory.estimate(cfg, 8, 512, 512, "fp16", int(2.2e9), graphs=True)
    assert 5 * gib < e.total < 16 * gib            # 512x512 batch 8 fits a 24 GiB GPU, as measured
    assert memory.estimate(cfg, 1, 1024, 1024, "fp16", 0).total > 2 * memory.estimate(cfg, 1, 512, 512, "fp16", 0).total
    with pytest.raises(ValueError, match=r"--height 2048 --width 2048 .* 24.0 GiB free.*at most (\d+)x\1 at this batch"):
        memory.check_fits(cfg, 4, 2048, 2048, "fp16", int(2.2e9), 50, "cuda", True, free=24 * gib, where="GPU")
    side = memory.largest_square(lambda s: memory.estimate(cfg, 1, s, s, "fp16", int(2.2e9), graphs=True).total <= 24 * gib)
    assert 1024 <= side < 4096 and side % 16 == 0


def test_run_rejects_unwritable_output(converted, tmp_path):
    _, model = converted
    blocker = write(tmp_path / "file", "")
    r = cli("run.py", "--prompt", "x", "--model-dir", model, "--out", blocker / "sub")
    refused(r, "--out", "not a writable folder")


def test_run_without_prompt_or_model(tmp_path, converted):
    _, model = converted
    refused(cli("run.py", "--model-dir", model, "--out", tmp_path), "--prompt")
    r = cli("run.py", "--prompt", "x", "--model-dir", tmp_path / "nowhere", "--out", tmp_path)
    refused(r, "nowhere", "convert_weights.py")
    empty = tmp_path / "empty"
    empty.mkdir()
    refused(cli("run.py", "--prompt", "x", "--model-dir", empty, "--out", tmp_path), "manifest.json", "convert_weights.py")


@pytest.mark.parametrize("content", ["missing", "directory", b"\xff\xfe bad utf-8"])
def test_run_unreadable_prompts_file(converted, tmp_path, content):
    f = tmp_path / "prompts.txt"
    if content == "directory":
        f.mkdir()
    elif isinstance(content, bytes):
        f.write_bytes(content)
    refused(cli("run.py", "--prompts-file", f, "--model-dir", converted[1], "--out", tmp_path / "O"), "--prompts-file")


def test_run_never_replaces_an_existing_image(converted, tmp_path):
    """A file of the user's at the output name survives; --overwrite is needed to replace it."""
    _, model = converted
    out = tmp_path / "O"
    mine = sentinel(out, "x_seed1234.png")
    refused(run_x(model, tmp_path, "--steps", "1", "--height", "32", "--width", "32"), "x_seed1234.png", "--overwrite")
    assert survives(mine) and not (out / "x_seed1234.json").exists()
    r = run_x(model, tmp_path, "--steps", "1", "--height", "32", "--width", "32", "--scale", "3", "--overwrite")
    assert r.returncode == 0, r.stderr
    assert Image.open(mine).size == (32, 32) and strict_json(out / "x_seed1234.json")["scale"] == 3.0


def test_concurrent_runs_never_mix_pairs(converted, tmp_path):
    """Two runs with other settings into one --out: every PNG's sidecar describes that PNG."""
    _, model = converted
    out = tmp_path / "O"
    prompts = write(tmp_path / "p.txt", "a\nb\nc\nd\n")
    env = child_env()
    procs = [subprocess.Popen([sys.executable, str(ROOT / "run.py"), "--prompts-file", str(prompts), "--model-dir",
                               str(model), "--out", str(out), "--steps", "1", "--height", "32", "--width", "32",
                               "--scale", scale, "--overwrite"], env=env, cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for scale in ("2", "5")]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) == 4 and not list(out.glob(".*"))
    for png in pngs:
        assert strict_json(png.with_suffix(".json"))["png_sha256"] == hashlib.sha256(png.read_bytes()).hexdigest()


def test_publish_together_never_replaces_without_overwrite(tmp_path):
    from unidiffuser.files import publish_together, temp_beside
    mine = sentinel(tmp_path, "a.json")
    tmp_png = temp_beside(tmp_path / "a.png", lambda p: Path(p).write_text("new png"))
    tmp_json = temp_beside(mine, lambda p: Path(p).write_text("new json"))
    with pytest.raises(FileExistsError, match="a.json"):
        publish_together([(tmp_png, tmp_path / "a.png"), (tmp_json, mine)], overwrite=False)
    assert survives(mine) and not (tmp_path / "a.png").exists() and sorted(os.listdir(tmp_path)) == ["a.json"]


# -- the model folder: every file checked against the manifest before any weights -------------

def damaged_copy(model: Path, tmp_path: Path) -> Path:
    bad = tmp_path / "model"
    shutil.copytree(model, bad)
    return bad


def test_run_detects_manifest_sha256_mismatch(converted, tmp_path):
    bad = damaged_copy(converted[1], tmp_path)
    data = bytearray((bad / "uvit.safetensors").read_bytes())
    data[-3] ^= 0xFF                                  # one flipped byte in the tensor data
    (bad / "uvit.safetensors").write_bytes(bytes(data))
    r = run_x(bad, tmp_path, "--steps", "1")
    refused(r, "uvit.safetensors", "sha256")
    assert not list((tmp_path / "O").glob("*.png"))


def test_run_detects_swapped_ids_in_vocab(converted, tmp_path):
    bad = damaged_copy(converted[1], tmp_path)
    vocab = json.loads((bad / "tokenizer" / "vocab.json").read_text())
    vocab["dog</w>"], vocab["cat</w>"] = vocab["cat</w>"], vocab["dog</w>"]
    (bad / "tokenizer" / "vocab.json").write_text(json.dumps(vocab))
    refused(run_x(bad, tmp_path), "tokenizer/vocab.json", "sha256")


def test_corrupt_tokenizer_vocab_is_a_clear_error(converted, tmp_path):
    from unidiffuser.tokenizer import Tokenizer
    folder = tmp_path / "tok"
    shutil.copytree(converted[1] / "tokenizer", folder)
    (folder / "vocab.json").write_text('{"a": 0, "b": "not an id"')
    with pytest.raises(ValueError, match=r"tok/vocab.json: not a readable JSON vocabulary"):
        Tokenizer(folder)


@pytest.mark.parametrize("edit, names", [
    (lambda c, m: c["uvit"].__setitem__("embed_dim", "32"), ["config.json", "uvit.embed_dim", "positive integer", "'32'"]),
    (lambda c, m: c["vae_decoder"].__setitem__("ch_mult", 2), ["config.json"]),
    (lambda c, m: c.__setitem__("uvit", []), ["config.json"]),
    (lambda c, m: m.__setitem__("files", []), ["manifest.json", '"files"']),
    (lambda c, m: m["files"].pop("tokenizer/merges.txt"), ["manifest.json", "tokenizer/merges.txt"]),
    (lambda c, m: m["files"]["uvit.safetensors"].__setitem__("sha256", 5), ["manifest.json", "uvit.safetensors"]),
    (lambda c, m: m.__setitem__("format", 1), ["manifest.json", "older convert_weights.py"]),
    (lambda c, m: m.__setitem__("random_weights", "no"), ["manifest.json", "random_weights"]),
])
def test_run_hand_edited_config_or_manifest(converted, tmp_path, edit, names):
    bad = damaged_copy(converted[1], tmp_path)
    c, m = json.loads((bad / "config.json").read_text()), json.loads((bad / "manifest.json").read_text())
    edit(c, m)
    (bad / "config.json").write_text(json.dumps(c))
    (bad / "manifest.json").write_text(json.dumps(m))
    refused(run_x(bad, tmp_path), *names)


def test_run_manifest_not_json(converted, tmp_path):
    bad = damaged_copy(converted[1], tmp_path)
    (bad / "manifest.json").write_text("{")
    refused(run_x(bad, tmp_path), "manifest.json", "not valid JSON")


# -- convert_weights.py ----------------------------------------------------------------------

def convert(src, out):
    return cli("convert_weights.py", "--preset", "tiny", "--src", src, "--out", out)


def test_convert_from_originals_round_trips(converted, tmp_path):
    src, model = converted
    r = cli("convert_weights.py", "--preset", "tiny", "--dtype", "fp32", "--src", src, "--out", tmp_path / "m32")
    assert r.returncode == 0, r.stderr
    manifest = json.loads((tmp_path / "m32" / "manifest.json").read_text())
    assert manifest["random_weights"] is True and manifest["dtype"] == "fp32"
    assert set(manifest["files"]) == {"text_encoder.safetensors", "uvit.safetensors", "vae_decoder.safetensors",
                                      "vae_encoder.safetensors", "image_encoder.safetensors",
                                      "caption_decoder.safetensors", "config.json", "tokenizer/vocab.json",
                                      "tokenizer/merges.txt", "caption_tokenizer/vocab.json",
                                      "caption_tokenizer/merges.txt"}
    for name, entry in manifest["files"].items():
        assert entry["sha256"] == hashlib.sha256((tmp_path / "m32" / name).read_bytes()).hexdigest()
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


def test_convert_help_layout_needs_no_out():
    r = cli("convert_weights.py", "--help-layout")
    assert r.returncode == 0 and "uvit_v1.pth" in r.stdout and "clip-vit-large-patch14" in r.stdout


@pytest.mark.parametrize("args, names", [
    ([], ["--out is required"]),
    (["--out", "m", "--random", "tiny", "--download"], ["--random and --download"]),
    (["--out", "m", "--random", "tiny", "--preset", "v1"], ["--preset v1", "--random tiny"]),
    (["--out", "m", "--src", "s", "--seed", "3"], ["--seed", "--random"]),
    (["--out", "m", "--random", "tiny", "--seed", "-1"], ["--seed"]),
    (["--out", "m"], ["--src", "--download", "--random"]),
    (["--out", "m", "--src", "/no/such/folder"], ["--src /no/such/folder", "not found"]),
])
def test_convert_rejects_bad_arguments(tmp_path, args, names):
    refused(cli("convert_weights.py", *args, cwd=tmp_path), *names)
    assert not (tmp_path / "m").exists()


def test_convert_out_is_a_file(converted, tmp_path):
    mine = sentinel(tmp_path, "model")
    refused(convert(converted[0], mine), f"--out {mine}", "not a folder")
    assert survives(mine)


@pytest.mark.parametrize("script", ["build_clip.py", "build_uvit.py"])
@pytest.mark.parametrize("n", ["0", "100000"])
def test_build_scripts_refuse_bad_batch(converted, script, n):
    refused(cli(script, "--model-dir", converted[1], "--max-batch-size", n), "--max-batch-size", "1..4096")


def test_convert_refuses_nonempty_out_before_any_work(converted, tmp_path):
    out = tmp_path / "out"
    mine = sentinel(out)
    r = convert(converted[0], out)
    refused(r, "--out", "--overwrite")
    assert "reading" not in r.stderr                  # refused before the originals were read
    assert survives(mine)


@pytest.mark.parametrize("where", [".", "home", "/"])
def test_convert_overwrite_never_replaces_cwd_home_or_root(tmp_path, where):
    cwd, home = tmp_path / "cwd", tmp_path / "home"
    mine, theirs = sentinel(cwd), sentinel(home)
    out = {".": ".", "home": str(home), "/": "/"}[where]
    r = cli("convert_weights.py", "--random", "tiny", "--out", out, "--overwrite", cwd=cwd, env={"HOME": str(home)})
    refused(r, f"--out {out}")
    assert survives(mine) and survives(theirs) and sorted(os.listdir(cwd)) == ["keep.txt"]


@pytest.mark.parametrize("out_is", ["src", "parent of src"])
def test_convert_overwrite_never_touches_src(converted, tmp_path, out_is):
    src = copy_originals(converted[0], tmp_path / "parent" / "src")
    (src / "RANDOM_WEIGHTS").unlink()                 # as real originals
    before = snapshot(src)
    out = src if out_is == "src" else src.parent
    r = cli("convert_weights.py", "--preset", "tiny", "--src", src, "--out", out, "--overwrite")
    refused(r, f"--out {out}", "--src")
    assert snapshot(src) == before


def test_convert_overwrite_refuses_a_folder_it_did_not_write(converted, tmp_path):
    out = tmp_path / "out"
    mine = sentinel(out)
    refused(cli("convert_weights.py", "--random", "tiny", "--out", out, "--overwrite"),
            f"--out {out}", "convert_weights.py wrote")
    assert survives(mine) and os.listdir(out) == ["keep.txt"]


def test_convert_overwrite_refuses_a_model_folder_holding_a_users_file(converted, tmp_path):
    out = damaged_copy(converted[1], tmp_path)
    mine = sentinel(out / "tokenizer", "notes.txt")
    refused(cli("convert_weights.py", "--random", "tiny", "--out", out, "--overwrite"),
            f"--out {out}", "tokenizer/notes.txt", "did not write")
    assert survives(mine)


def test_convert_overwrite_replaces_its_own_folder(converted, tmp_path):
    out = damaged_copy(converted[1], tmp_path)         # a model folder with trtllm/ in it
    old = json.loads((out / "manifest.json").read_text())
    r = cli("convert_weights.py", "--random", "tiny", "--seed", "5", "--out", out, "--overwrite")
    assert r.returncode == 0, r.stderr
    new = json.loads((out / "manifest.json").read_text())
    assert new["files"]["uvit.safetensors"]["sha256"] != old["files"]["uvit.safetensors"]["sha256"]
    assert not (out / "trtllm").exists()               # made from the old weights: gone with them
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]     # nothing set aside is left


def test_convert_random_never_replaces_real_originals(converted, tmp_path):
    src = copy_originals(converted[0], tmp_path / "src")
    (src / "RANDOM_WEIGHTS").unlink()                 # as real originals
    before = snapshot(src)
    r = cli("convert_weights.py", "--random", "tiny", "--src", src, "--out", tmp_path / "m")
    refused(r, f"--src {src}", "--random would replace")
    assert snapshot(src) == before and not (tmp_path / "m").exists()


def test_convert_random_into_a_folder_with_a_users_file(tmp_path):
    mine = sentinel(tmp_path / "src")
    refused(cli("convert_weights.py", "--random", "tiny", "--src", tmp_path / "src", "--out", tmp_path / "m"), "--src")
    assert survives(mine)


def test_convert_download_never_replaces_placed_files(converted, tmp_path):
    src = copy_originals(converted[0], tmp_path / "src")
    (src / "RANDOM_WEIGHTS").unlink()
    before = snapshot(src)
    refused(cli("convert_weights.py", "--download", "--src", src, "--out", tmp_path / "m"),
            f"--src {src}", "uvit_v1.pth", "--download would replace")
    assert snapshot(src) == before


def test_convert_offline_download_says_where_files_go(tmp_path):
    r = cli("convert_weights.py", "--download", "--src", tmp_path / "orig", "--out", tmp_path / "m",
            env={"HF_HUB_OFFLINE": "1"})
    refused(r, "uvit_v1.pth", "caption_decoder.pth", "autoencoder_kl.pth", "clip-vit-large-patch14", "--random")
    assert not (tmp_path / "m").exists()
    assert not (tmp_path / "orig").exists()            # it did not exist before: nothing left behind


@pytest.mark.parametrize("existed", [False, True])
def test_failed_download_removes_only_what_it_created(tmp_path, monkeypatch, existed):
    """huggingface_hub prints each retry line through its own handler; it must not reach ours
    too (printed twice), and the .cache/ it made is removed (the user's folder and files stay)."""
    import logging

    import huggingface_hub
    from huggingface_hub.utils import logging as hub_logging

    from unidiffuser.weights import folders, originals
    src = tmp_path / "orig"
    mine = sentinel(src) if existed else None

    def offline(repo, filename, local_dir):
        if filename == "uvit_v1.pth":                 # the first file arrives, the second does not
            (Path(local_dir) / ".cache" / "huggingface" / "download").mkdir(parents=True, exist_ok=True)
            write(Path(local_dir) / filename, "downloaded")
            return
        hub_logging.get_logger("huggingface_hub.utils._http").warning("Retrying in 1s [Retry 1/5].")
        raise OSError("network unreachable")

    class Collect(logging.Handler):   # stands for the terminal handler cli.run installs on the root
        def emit(self, record):
            ours.append(record.getMessage())

    ours, handler = [], Collect()
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    logging.getLogger().addHandler(handler)
    try:
        with pytest.raises(folders.CheckpointError, match="--random"):
            originals.download_originals(src)
    finally:
        logging.getLogger().removeHandler(handler)
    assert not [m for m in ours if "Retrying" in m]
    assert logging.getLogger("huggingface_hub").handlers           # its own handler prints the line once
    assert logging.getLogger("huggingface_hub").propagate           # restored afterwards
    if existed:
        assert survives(mine) and sorted(os.listdir(src)) == ["keep.txt"]
    else:
        assert not src.exists()


def space_error(kind):
    if kind == "OSError":
        return OSError(errno.ENOSPC, "No space left on device")
    if kind == "SafetensorError":
        from safetensors import SafetensorError
        return SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                               'message: "No space left on device" })')
    return RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0")


@pytest.mark.parametrize("kind", ["OSError", "SafetensorError", "RuntimeError"])
@pytest.mark.parametrize("overwrite", [False, True])
def test_convert_disk_full_leaves_nothing_half_written(converted, tmp_path, monkeypatch, capsys, kind, overwrite):
    import convert_weights
    from unidiffuser import cli as cli_module, files
    from unidiffuser.weights import convert
    out = damaged_copy(converted[1], tmp_path) if overwrite else tmp_path / "model"
    before = snapshot(out) if overwrite else None

    def full(*args, **kwargs):
        raise space_error(kind)

    monkeypatch.setattr(convert, "save_file", full)
    if kind == "RuntimeError":   # torch.save's error carries no errno: the free space tells
        monkeypatch.setattr(files.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10 << 30, 10 << 30, 0))
    with pytest.raises(SystemExit) as e:
        cli_module.run(lambda: convert_weights.main(["--preset", "tiny", "--src", str(converted[0]), "--out", str(out)]
                                                    + (["--overwrite"] if overwrite else [])))
    err = capsys.readouterr().err
    assert e.value.code == 2 and "disk is full" in err and "Traceback" not in err
    assert "uvit.safetensors" in err or "text_encoder.safetensors" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == (["model"] if overwrite else [])   # no temp folder left
    if overwrite:
        assert snapshot(out) == before


# -- build_*.py -------------------------------------------------------------------------------

@pytest.mark.parametrize("script", ["build_uvit.py", "build_decoder.py"])
@pytest.mark.parametrize("size", ["0", "-16", "100", "100000"])
def test_build_scripts_refuse_bad_sizes(converted, script, size):
    refused(cli(script, "--model-dir", converted[1], "--height", size), "--height", "multiple of 16", "4096")
    refused(cli(script, "--model-dir", converted[1], "--width", size), "--width")


@pytest.mark.skipif(__import__("importlib").util.find_spec("tensorrt_llm") is not None,
                    reason="tensorrt_llm is installed here; the no-TensorRT-LLM message cannot be shown")
@pytest.mark.parametrize("script", ["build_clip.py", "build_uvit.py", "build_decoder.py"])
def test_build_scripts_without_tensorrt_llm_exit_2(converted, tmp_path, script):
    refused(cli(script, "--model-dir", converted[1], "--output-dir", tmp_path / "e"), "tensorrt_llm is not installed")
    assert not (tmp_path / "e").exists()


# -- every command: fast --help and argument errors, Ctrl-C -----------------------------------

@pytest.mark.parametrize("script, bad", [
    ("run.py", ["--model-dir", "m", "--prompt", "x", "--scale", "nan"]),
    ("convert_weights.py", ["--random", "tiny"]),
    ("build_clip.py", ["--max-batch-size", "0", "--model-dir", "m"]),
    ("build_uvit.py", ["--height", "0", "--model-dir", "m"]),
    ("build_decoder.py", ["--width", "8", "--model-dir", "m"]),
    ("bench.py", ["--steps", "x"]),
])
def test_help_and_argument_errors_import_no_torch(script, bad):
    """--help and argument errors answer before torch (seconds to import) is loaded."""
    probe = ("import runpy, sys\n"
             "sys.argv = [sys.argv[1]] + sys.argv[2:]\n"
             "try:\n    runpy.run_path(sys.argv[0], run_name='__main__')\n"
             "except SystemExit as e:\n    code = e.code\n"
             "heavy = sorted(m for m in ('torch', 'transformers', 'safetensors') if m in sys.modules)\n"
             "print('CODE', code, 'HEAVY', heavy, file=sys.stderr)\n")
    for args in (["--help"], bad):
        r = subprocess.run([sys.executable, "-c", probe, str(ROOT / script), *args], capture_output=True, text=True,
                           cwd=ROOT, env=child_env())
        assert "HEAVY []" in r.stderr, r.stderr
        assert ("CODE 0" if args == ["--help"] else "CODE 2") in r.stderr, r.stderr


def test_ctrl_c_exits_130_without_traceback(capsys):
    from unidiffuser import cli as cli_module

    def interrupted():
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as e:
        cli_module.run(interrupted)
    assert e.value.code == 130 and "Traceback" not in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="the default device here is a GPU; this case needs a CPU-only machine")
@pytest.mark.parametrize("args, names", [(["--compile"], ["--compile", "CUDA GPU"]),
                                         (["--dtype", "fp8"], ["--dtype fp8", "CUDA GPU"])])
def test_gpu_only_options_on_the_default_cpu_device_refused_before_loading(converted, tmp_path, args, names):
    r = run_x(converted[1], tmp_path, *args)
    refused(r, *names)
    assert "loaded" not in r.stderr    # no weights were read


# -- every task (unidiffuser/tasks.py) through run.py --------------------------------------------

def one_line(r, *names):
    """Refused (exit 2, no traceback, naming each of names) in one line."""
    refused(r, *names)
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


@pytest.fixture(scope="module")
def task_images(tmp_path_factory):
    return input_images(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="module")
def unloadable(converted, tmp_path_factory):
    """A model folder whose every network file fails its sha256: a run that got as far as the
    weights would say so instead of naming the bad input."""
    bad = tmp_path_factory.mktemp("unloadable") / "model"
    shutil.copytree(converted[1], bad, ignore=shutil.ignore_patterns("trtllm"))
    for f in bad.glob("*.safetensors"):
        data = bytearray(f.read_bytes())
        data[-3] ^= 0xFF
        f.write_bytes(bytes(data))
    return bad


def run_in_process(capsys, *args) -> list[Path]:
    """run.py's main() in this process (no torch import per run): the paths it printed."""
    import run
    capsys.readouterr()
    assert run.main([str(a) for a in args]) == 0
    return [Path(line) for line in capsys.readouterr().out.splitlines()]


@pytest.mark.parametrize("task", TASKS)
def test_run_every_task_writes_its_outputs_and_sidecars(converted, task_images, tmp_path, capsys, one_thread, task):
    t, out, big = TASKS[task], tmp_path / "O", task_images["big.png"]
    given = {"prompt": ["--prompt", "a red cube"], "image": ["--image", big], None: ["--n-samples", "2"]}[t.input]
    printed = run_in_process(capsys, "--task", task, *given, "--model-dir", converted[1], "--out", out,
                             "--steps", "2", "--height", "32", "--width", "32", "--seed", "5")
    seeds = [5] if t.input else [5, 6]
    stems = [{"prompt": "a-red-cube_", "image": "big_", None: ""}[t.input] + ("" if task == "t2i" else f"{task}_")
             + f"seed{s}" for s in seeds]
    suffixes = [{"image": ".png", "text": ".txt"}[o] for o in t.outputs]
    assert printed == [out / (stem + sfx) for stem in stems for sfx in suffixes]
    assert sorted(os.listdir(out)) == sorted(stem + sfx for stem in stems for sfx in suffixes + [".json"])
    for stem, seed in zip(stems, seeds):
        side = strict_json(out / f"{stem}.json")
        assert side["task"] == task and side["seed"] == seed and side["steps"] == 2
        record = {"prompt": "a red cube", None: None,
                  "image": {"name": "big.png", "sha256": hashlib.sha256(big.read_bytes()).hexdigest(), "size": [71, 50]}}
        assert {"prompt", "image"} & set(side) == ({t.input} if t.input else set())
        assert side.get(t.input) == record[t.input]
        if "image" in t.outputs:
            png = out / f"{stem}.png"
            assert Image.open(png).size == (32, 32) and side["png_sha256"] == hashlib.sha256(png.read_bytes()).hexdigest()
        if "text" in t.outputs:
            txt = out / f"{stem}.txt"
            assert txt.read_text(encoding="utf-8") == side["text"] + "\n"
            assert side["txt_sha256"] == hashlib.sha256(txt.read_bytes()).hexdigest()
        assert ("png_sha256" in side) == ("image" in t.outputs) and ("text" in side) == ("text" in t.outputs)


def test_run_never_replaces_an_existing_caption(converted, task_images, tmp_path, monkeypatch):
    """A text output is guarded like an image: refused before the model is loaded, nothing written."""
    from unidiffuser.api import UniDiffuser
    import run
    out = tmp_path / "O"
    mine = sentinel(out, "big_i2t_seed5.txt")
    monkeypatch.setattr(UniDiffuser, "from_options", lambda *a, **k: pytest.fail("loaded the model"))
    with pytest.raises(ValueError, match="big_i2t_seed5.txt already exist.*--overwrite"):
        run.main(["--task", "i2t", "--image", str(task_images["big.png"]), "--model-dir", str(converted[1]),
                  "--out", str(out), "--seed", "5"])
    assert survives(mine) and os.listdir(out) == ["big_i2t_seed5.txt"]


def test_run_images_file_of_every_kind(converted, task_images, tmp_path):
    """--images-file (names relative to its folder, or absolute): an animated GIF, 16-bit, palette,
    RGBA, CMYK and a smaller image all run (converted as the original: Image.open().convert('RGB'));
    each sidecar records its image, the smaller one as upscaled."""
    folder = tmp_path / "in"
    folder.mkdir()
    kinds = ["anim.gif", "grey16.png", "palette.png", "rgba.png", "cmyk.jpg", "small.png"]
    for k in kinds:
        shutil.copy(task_images[k], folder / k)
    write(folder / "list.txt", "\n".join(kinds + [str(task_images["big.png"])]) + "\n")
    r = cli("run.py", "--task", "i2t2i", "--images-file", "in/list.txt", "--model-dir", converted[1], "--out", "O",
            "--steps", "1", "--height", "32", "--width", "32", cwd=tmp_path, env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    names = kinds + ["big.png"]
    stems = [f"{Path(n).stem}_i2t2i_seed{1234 + i}" for i, n in enumerate(names)]
    assert r.stdout.split() == [f"O/{s}.png" for s in stems]
    for name, stem in zip(names, stems):
        side = strict_json(tmp_path / "O" / f"{stem}.json")
        source = folder / name if name != "big.png" else task_images["big.png"]
        assert side["image"]["name"] == name and side["image"]["sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()
        assert side["image"]["size"] == list(Image.open(source).size)
        assert side["image"].get("upscaled", False) == (name == "small.png")
        assert Image.open(tmp_path / "O" / f"{stem}.png").size == (32, 32)


@pytest.mark.parametrize("args, names", [
    (["--task", "i2t", "--prompt", "x"], ["--task i2t takes no --prompt", "--image"]),
    (["--task", "i2t2i", "--image", "IMAGE", "--prompt", "x"], ["--task i2t2i takes no --prompt"]),
    (["--task", "t2i", "--image", "IMAGE"], ["--task t2i takes no --image", "--prompt"]),
    (["--task", "t2i2t", "--prompt", "x", "--image", "IMAGE"], ["--task t2i2t takes no --image"]),
    (["--task", "joint", "--prompt", "x"], ["--task joint takes no --prompt", "no input"]),
    (["--task", "t", "--image", "IMAGE"], ["--task t takes no --image", "no input"]),
    (["--task", "i2t"], ["--task i2t needs at least one --image or an --images-file"]),
    (["--task", "i2t2i"], ["--task i2t2i needs at least one --image"]),
    (["--task", "t2i2t"], ["--prompt"]),
    (["--task", "t2i"], ["--prompt"]),
    (["--task", "i2t", "--image", "IMAGE", "--backend", "trtllm"],
     ["--backend trtllm runs text-to-image only", "--task i2t needs --backend torch"]),
    (["--task", "joint", "--backend", "trtllm"], ["--backend trtllm", "--task joint"]),
])
def test_run_wrong_input_for_the_task(unloadable, task_images, tmp_path, args, names):
    args = [task_images["big.png"] if a == "IMAGE" else a for a in args]
    one_line(cli("run.py", *args, "--model-dir", unloadable, "--out", tmp_path / "O"), *names)
    assert not (tmp_path / "O").exists()


@pytest.mark.parametrize("name, why", [
    ("missing.png", "file not found"), ("folder", "not a file"), ("not_image.png", "not an image PIL can read"),
    ("truncated.png", "not a readable image"), ("truncated.jpg", "not a readable image"),
    ("bomb.png", "too many pixels"), ("huge_bomb.png", "too many pixels"),
])
def test_run_bad_image_refused_before_any_weights(unloadable, task_images, tmp_path, name, why):
    """One line naming the file, exit 2, nothing written; the model folder's broken weights are
    never reached (they would be reported instead)."""
    path = task_images.get(name) or tmp_path / name
    if name == "folder":
        path.mkdir()
    r = cli("run.py", "--task", "i2t", "--image", task_images["big.png"], "--image", path, "--model-dir", unloadable,
            "--out", tmp_path / "O")
    one_line(r, f"--image {path}: {why}")
    assert not (tmp_path / "O").exists()


def test_run_images_file_errors_name_the_file(unloadable, task_images, tmp_path):
    listing = write(tmp_path / "list.txt", "gone.png\n")
    one_line(cli("run.py", "--task", "i2t2i", "--images-file", listing, "--model-dir", unloadable, "--out", tmp_path / "O"),
             f"--image {tmp_path / 'gone.png'}: file not found")
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe not utf-8")
    one_line(cli("run.py", "--task", "i2t", "--images-file", tmp_path / "bad.txt", "--model-dir", unloadable,
                 "--out", tmp_path / "O"), f"--images-file {tmp_path / 'bad.txt'}", "UTF-8")
    assert not (tmp_path / "O").exists()


@pytest.fixture(scope="module")
def pre_task_model(converted, tmp_path_factory):
    return copy_without_task_networks(converted[1], tmp_path_factory.mktemp("pre-task") / "model")


def test_run_on_a_folder_from_before_the_other_tasks(pre_task_model, task_images, tmp_path, capsys, one_thread):
    """Text-to-image runs on it; any other task is one line naming the missing network and what to
    re-run, from the manifest, before any weights (a task that captions at the end must not sample first)."""
    printed = run_in_process(capsys, "--prompt", "a red cube", "--model-dir", pre_task_model, "--out", tmp_path / "t2i",
                             "--steps", "1", "--height", "32", "--width", "32")
    assert [p.name for p in printed] == ["a-red-cube_seed1234.png"]
    for task, given, missing in [("i2t", ["--image", task_images["big.png"]], "vae_encoder"), ("t", [], "caption_decoder"),
                                 ("t2i2t", ["--prompt", "x"], "caption_decoder")]:
        r = cli("run.py", "--task", task, *given, "--model-dir", pre_task_model, "--out", tmp_path / task)
        one_line(r, str(pre_task_model), f"has no {missing}.safetensors", "re-run convert_weights.py")
        assert not (tmp_path / task).exists()
