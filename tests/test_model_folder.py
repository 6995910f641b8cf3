"""Every file of a model folder is checked for its content, not only for its checksum: the
folders here are damaged and their manifest regenerated to match, as a hand edit or another
tool would leave them. Each is one line naming the file (and the field or tensor), exit 2, no
traceback, nothing written."""
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import child_env
from safetensors.torch import load_file, save_file

from unidiffuser import limits, tokenizer
from unidiffuser.weights import folders

ROOT = Path(__file__).resolve().parents[1]


def cli(script, *args):
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], capture_output=True, text=True,
                          env=child_env(), cwd=ROOT)


def refused(r, *names):
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    lines = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, r.stderr
    for name in names:
        assert name in lines[0], (name, lines[0])


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    base = tmp_path_factory.mktemp("tiny")
    r = cli("convert_weights.py", "--random", "tiny", "--src", base / "src", "--out", base / "model")
    assert r.returncode == 0, r.stderr
    return base


def damaged(model, tmp_path) -> Path:
    return Path(shutil.copytree(model / "model", tmp_path / "model"))


def regenerate(folder: Path) -> None:
    """The manifest made to match whatever the files now hold (sha256 and size of each)."""
    m = json.loads((folder / "manifest.json").read_text())
    for name, entry in m["files"].items():
        data = (folder / name).read_bytes()
        entry.update(sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))
    (folder / "manifest.json").write_text(json.dumps(m))


def run_on(folder, tmp_path, *extra):
    out = tmp_path / "out"
    r = cli("run.py", "--prompt", "x", "--model-dir", folder, "--out", out, "--steps", 1, "--height", 32,
            "--width", 32, *extra)
    assert not out.exists() or not list(out.iterdir())
    return r


def edit_config(folder: Path, net: str, field: str, value) -> None:
    c = json.loads((folder / "config.json").read_text())
    c[net][field] = value
    (folder / "config.json").write_text(json.dumps(c))
    regenerate(folder)


# -- config.json: values that no network can be built or run from --------------------------------

CONFIG_CASES = [
    ("uvit", "embed_dim", 33, "multiple of uvit.num_heads"),
    ("uvit", "num_heads", 5, "multiple of uvit.num_heads"),
    ("uvit", "patch_size", 3, "divide uvit.img_size"),
    ("uvit", "num_text_tokens", 76, "tokenizer"),
    ("uvit", "text_dim", 9, "text_encoder.prefix_dim"),
    ("uvit", "in_chans", 3, "vae_decoder.embed_dim"),
    ("uvit", "depth", 10**9, "positive integer of at most"),
    ("uvit", "img_size", 1024, "at most 4096"),
    ("text_encoder", "hidden_size", 33, "num_attention_heads"),
    ("text_encoder", "max_position_embeddings", 10, "at least 77"),
    ("text_encoder", "vocab_size", 100, "at least 49408"),
    ("text_encoder", "hidden_act", "relu", "quick_gelu"),
    ("text_encoder", "layer_norm_eps", float("inf"), "positive finite"),
    ("text_encoder", "num_hidden_layers", 1000, "at most 256"),
    ("vae_decoder", "ch_mult", [], "list of 1 to 8"),
    ("vae_decoder", "ch_mult", [1, 1, 2, 2, 4], "multiples of 32"),
    ("vae_decoder", "num_groups", 7, "divide every level's channels"),
    ("vae_decoder", "out_ch", 1, "RGB"),
    ("vae_decoder", "eps", 0, "positive finite"),
]


@pytest.mark.parametrize("net, field, value, why", CONFIG_CASES, ids=[f"{n}.{f}={v}" for n, f, v, _ in CONFIG_CASES])
def test_inconsistent_config_names_the_field(model, tmp_path, net, field, value, why):
    bad = damaged(model, tmp_path)
    edit_config(bad, net, field, value)
    with pytest.raises(folders.CheckpointError) as e:
        folders.read_manifest(bad)
    assert "config.json" in str(e.value) and f"{net}.{field}" in str(e.value) and why in str(e.value), str(e.value)


@pytest.mark.parametrize("net, field, value", [("uvit", "embed_dim", 33), ("vae_decoder", "num_groups", 7),
                                               ("vae_decoder", "ch_mult", [1, 1, 2, 2, 4])])
def test_run_refuses_an_inconsistent_config_in_one_line(model, tmp_path, net, field, value):
    bad = damaged(model, tmp_path)
    edit_config(bad, net, field, value)
    refused(run_on(bad, tmp_path), "config.json", f"{net}.{field}")


def test_the_constants_of_the_checks_are_the_tokenizers_and_text_encoders():
    from models.text_encoder import ACTIVATIONS
    assert folders.TEXT_TOKENS == tokenizer.MAX_LENGTH and folders.VOCAB_SIZE == tokenizer.VOCAB_SIZE
    assert set(folders.ACTIVATIONS) == set(ACTIVATIONS)


# -- the networks' tensors: the dtype the manifest declares ---------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.int64])
def test_tensor_in_another_dtype_than_the_manifest_says(model, tmp_path, dtype):
    bad = damaged(model, tmp_path)
    sd = load_file(str(bad / "uvit.safetensors"))
    sd["pos_embed"] = sd["pos_embed"].to(dtype)
    save_file(sd, str(bad / "uvit.safetensors"))
    regenerate(bad)
    name = {torch.float32: "F32", torch.int64: "I64"}[dtype]
    refused(run_on(bad, tmp_path), "uvit.safetensors", "pos_embed", name, "fp16")


def test_manifest_network_dtype_must_be_the_folders(model, tmp_path):
    bad = damaged(model, tmp_path)
    m = json.loads((bad / "manifest.json").read_text())
    m["files"]["vae_decoder.safetensors"]["dtype"] = "fp32"
    (bad / "manifest.json").write_text(json.dumps(m))
    refused(run_on(bad, tmp_path), "manifest.json", "vae_decoder.safetensors", '"dtype"')


def test_vocab_id_out_of_range(model, tmp_path):
    bad = damaged(model, tmp_path)
    vocab = json.loads((bad / "tokenizer" / "vocab.json").read_text())
    vocab["dog</w>"] = 10**9
    (bad / "tokenizer" / "vocab.json").write_text(json.dumps(vocab))
    regenerate(bad)
    refused(run_on(bad, tmp_path), "tokenizer/vocab.json", "0..49407")


# -- JSON: nesting and size limits in every JSON file of the folder --------------------------------

DEEP = "[" * 100_000 + "]" * 100_000


def nest_header(path: Path) -> None:
    """A safetensors file whose header has one entry nested 100 000 levels deep."""
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    text = json.dumps(header)[:-1] + ', "deep": ' + DEEP + "}"
    raw = text.encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + n:])


@pytest.mark.parametrize("which", ["manifest.json", "config.json", "tokenizer/vocab.json", "uvit.safetensors"])
def test_deeply_nested_json_is_one_line(model, tmp_path, which):
    bad = damaged(model, tmp_path)
    if which == "uvit.safetensors":
        nest_header(bad / which)
    elif which == "manifest.json":
        (bad / which).write_text('{"format": ' + DEEP + "}")
    else:
        (bad / which).write_text('{"a": ' + DEEP + "}")
    if which != "manifest.json":
        regenerate(bad)
    refused(run_on(bad, tmp_path), which, "nested", "levels deep")


def test_oversized_manifest_is_one_line(model, tmp_path):
    bad = damaged(model, tmp_path)
    m = json.loads((bad / "manifest.json").read_text())
    m["padding"] = "x" * (2 << 20)
    (bad / "manifest.json").write_text(json.dumps(m))
    refused(run_on(bad, tmp_path), "manifest.json", "larger than")


def test_convert_refuses_a_deeply_nested_clip_config(model, tmp_path):
    src = Path(shutil.copytree(model / "src", tmp_path / "src"))
    (src / "clip-vit-large-patch14" / "config.json").write_text(DEEP)
    r = cli("convert_weights.py", "--preset", "tiny", "--src", src, "--out", tmp_path / "m")
    refused(r, "clip-vit-large-patch14/config.json", "nested")
    (src / "clip-vit-large-patch14" / "config.json").write_text("[1, 2]")
    refused(cli("convert_weights.py", "--preset", "tiny", "--src", src, "--out", tmp_path / "m"),
            "clip-vit-large-patch14/config.json", "not a CLIP config")
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("text, depth", [("1", 0), ("[]", 1), ('{"a": [1, {"b": []}]}', 4),
                                         ('["[[[[", "\\"]]]"]', 1), ('{"k{[": "v"}', 1)])
def test_json_depth_skips_strings(text, depth):
    assert limits.json_depth(text) == depth
    assert limits.parse_json(text, 100) == json.loads(text)


def test_parse_json_limits():
    with pytest.raises(limits.JSONError, match="larger than"):
        limits.parse_json("[1]", 2)
    with pytest.raises(limits.JSONError, match="nested 33 levels"):
        limits.parse_json("[" * 33 + "]" * 33, 1000)
    with pytest.raises(limits.JSONError, match="not UTF-8"):
        limits.parse_json(b"\xff", 10)
    with pytest.raises(limits.JSONError, match="not valid JSON"):
        limits.parse_json("[1", 10)
    assert limits.json_depth("[" * 200_000) == 200_000       # the large path (numpy)
