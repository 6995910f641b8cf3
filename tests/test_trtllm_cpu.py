"""The TensorRT-LLM path's CPU-side pieces: checkpoint folders, build-script argument handling
and errors, and the engine-folder contract. No TensorRT(-LLM) needed."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from models.config import PRESETS
from unidiffuser import checkpoints, engine_build, trtllm_checkpoint
from unidiffuser.engine_build import EngineError, check_engine_config

ROOT = Path(__file__).resolve().parents[1]
NETS = ("text_encoder", "uvit", "vae_decoder")


def run(*args, cwd=ROOT):
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("trtllm") / "model"
    r = run("convert_weights.py", "--random", "tiny", "--out", out, "--trtllm")
    assert r.returncode == 0, r.stderr
    return out


def test_checkpoint_folders_match_reference_parameters(model_dir):
    cfg = PRESETS["tiny"]
    for net in NETS:
        folder = model_dir / "trtllm" / net
        expected = {k: tuple(p.shape) for k, p in checkpoints.build(net, cfg).named_parameters()}
        with safe_open(str(folder / "rank0.safetensors"), "pt") as f:
            got = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
            assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
        assert got == expected, net
        assert trtllm_checkpoint.expected_tensors(net, cfg) == expected


def test_checkpoint_values_equal_converted_weights(model_dir):
    cfg, manifest = checkpoints.read_manifest(model_dir)
    sd = checkpoints.load_network(model_dir, "uvit", cfg, manifest)
    with safe_open(str(model_dir / "trtllm" / "uvit" / "rank0.safetensors"), "pt") as f:
        for k in ("pos_embed", "in_blocks.0.attn.qkv.weight", "token_embedding.weight"):
            assert torch.equal(f.get_tensor(k), sd[k].half())


def test_checkpoint_config_json(model_dir):
    cfg, manifest = checkpoints.read_manifest(model_dir)
    for net in NETS:
        c = json.loads((model_dir / "trtllm" / net / "config.json").read_text())
        assert c["architecture"] == trtllm_checkpoint.ARCHITECTURES[net]
        assert c["dtype"] == "float16" and c["network"] == net
        assert c["mapping"] == {"world_size": 1, "tp_size": 1, "pp_size": 1}
        assert c["model_config"] == json.loads(json.dumps(cfg.to_dict()[net]))
        assert c["source"]["sha256"] == manifest["files"][f"{net}.safetensors"]["sha256"]
    u = json.loads((model_dir / "trtllm" / "uvit" / "config.json").read_text())
    assert (u["hidden_size"], u["num_attention_heads"], u["num_hidden_layers"]) == (32, 2, 4)
    assert u["latent_factor"] == 8


@pytest.mark.parametrize("script,net", [("build_clip.py", "text_encoder"), ("build_uvit.py", "uvit"),
                                        ("build_decoder.py", "vae_decoder")])
def test_build_script_missing_checkpoint_names_convert_step(tmp_path, script, net):
    r = run(script, "--model-dir", tmp_path / "nothing")
    assert r.returncode == 2
    assert "convert_weights.py" in r.stderr and "--trtllm" in r.stderr
    assert str(tmp_path / "nothing" / "trtllm" / net) in r.stderr


def test_build_script_wrong_network_folder(model_dir, tmp_path):
    r = run("build_uvit.py", "--checkpoint-dir", model_dir / "trtllm" / "vae_decoder", "--output-dir", tmp_path)
    assert r.returncode == 2 and "expected 'uvit'" in r.stderr


def test_build_script_argument_errors(model_dir):
    r = run("build_uvit.py")
    assert r.returncode == 2 and "--model-dir" in r.stderr
    r = run("build_uvit.py", "--model-dir", model_dir, "--height", "100")
    assert r.returncode == 2 and "multiple of 16" in r.stderr
    r = run("build_clip.py", "--model-dir", model_dir, "--max-batch-size", "0")
    assert r.returncode == 2 and "--max-batch-size" in r.stderr
    r = run("build_decoder.py", "--model-dir", model_dir, "--plugin-lib", "/no/such/lib.so")
    assert r.returncode == 2 and "cmake" in r.stderr


@pytest.mark.skipif(__import__("importlib").util.find_spec("tensorrt_llm") is not None,
                    reason="tensorrt_llm is installed here; the no-TensorRT-LLM message cannot be shown")
@pytest.mark.parametrize("script", ["build_clip.py", "build_uvit.py", "build_decoder.py"])
def test_build_script_without_tensorrt_llm(model_dir, tmp_path, script):
    r = run(script, "--model-dir", model_dir, "--output-dir", tmp_path / "e")
    assert r.returncode != 0
    assert "tensorrt_llm is not installed: build engines inside the Docker image, see docs/engines.md" in r.stderr
    assert not (tmp_path / "e").exists()


# --- the engine-folder contract ------------------------------------------------------------------

def fake_engine_dir(root: Path, model_dir: Path, rows=8, latent=(16, 16)):
    cfg, manifest = checkpoints.read_manifest(model_dir)
    for net in NETS:
        ckpt, weights = trtllm_checkpoint.read_checkpoint(model_dir / "trtllm" / net, net)
        c = engine_build.engine_config(net, ckpt, weights, rows if net == "uvit" else rows // 2, rows // 2,
                                       None if net == "text_encoder" else latent, {}, 1.0, {})
        engine_build.write_engine(root / net, b"not really an engine", c)
    return cfg, manifest


def test_engine_contract_accepts_matching_engines(model_dir, tmp_path):
    from unidiffuser.trtllm_backend import check_engines
    cfg, manifest = fake_engine_dir(tmp_path, model_dir)
    configs = check_engines(tmp_path, cfg, manifest, torch.float16)
    assert configs["uvit"]["max_batch_size"] == 8 and configs["uvit"]["max_images"] == 4
    check_engine_config(configs["uvit"], "uvit", cfg, rows=8, latent=(16, 16))


def test_engine_contract_errors_name_the_build_script(model_dir, tmp_path):
    from unidiffuser.trtllm_backend import check_engines
    cfg, manifest = fake_engine_dir(tmp_path, model_dir)
    uvit = json.loads((tmp_path / "uvit" / "config.json").read_text())
    with pytest.raises(EngineError, match=r"build_uvit.py --max-batch-size 5"):
        check_engine_config(uvit, "uvit", cfg, rows=10)
    with pytest.raises(EngineError, match=r"build_uvit.py --height 256 --width 128"):
        check_engine_config(uvit, "uvit", cfg, rows=2, latent=(32, 16))
    with pytest.raises(EngineError, match=r"another model config.*build_uvit.py"):
        check_engine_config(uvit, "uvit", PRESETS["v1"])
    with pytest.raises(EngineError, match=r"--dtype fp16"):
        check_engine_config({**uvit, "dtype": "float32"}, "uvit", cfg)
    with pytest.raises(EngineError, match=r"--dtype fp16"):
        check_engines(tmp_path, cfg, manifest, torch.float32)
    (tmp_path / "vae_decoder" / "rank0.engine").unlink()
    with pytest.raises(EngineError, match=r"no engine; build it with: python build_decoder.py"):
        check_engines(tmp_path, cfg, manifest, torch.float16)
    with pytest.raises(EngineError, match=r"no engine.*build_clip.py"):
        check_engines(tmp_path / "missing", cfg, manifest, torch.float16)


def test_engine_contract_other_weights(model_dir, tmp_path):
    from unidiffuser.trtllm_backend import check_engines
    cfg, manifest = fake_engine_dir(tmp_path, model_dir)
    other = json.loads(json.dumps(manifest))
    other["files"]["uvit.safetensors"]["sha256"] = "0" * 64
    with pytest.raises(EngineError, match=r"other weights.*build_uvit.py"):
        check_engines(tmp_path, cfg, other, torch.float16)


def test_run_py_trtllm_without_engines_fails_clearly(model_dir, tmp_path):
    r = run("run.py", "--prompt", "x", "--model-dir", model_dir, "--backend", "trtllm", "--device", "cpu",
            "--out", tmp_path / "o", "--engine-dir", tmp_path / "none")
    assert r.returncode == 2
    assert "CUDA" in r.stderr or "build_clip.py" in r.stderr
