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
from unidiffuser import networks
from unidiffuser.engines import build as engine_build, checkpoint as trtllm_checkpoint
from unidiffuser.weights import folders, loading
from unidiffuser.backends.engine_folder import EngineError, check_engine_config

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
        expected = {k: tuple(p.shape) for k, p in networks.build(net, cfg).named_parameters()}
        with safe_open(str(folder / "rank0.safetensors"), "pt") as f:
            got = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
            assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
        assert got == expected, net
        assert trtllm_checkpoint.expected_tensors(net, cfg) == expected


def test_checkpoint_values_equal_converted_weights(model_dir):
    cfg, manifest = folders.read_manifest(model_dir)
    sd = loading.load_network(model_dir, "uvit", cfg, manifest)
    with safe_open(str(model_dir / "trtllm" / "uvit" / "rank0.safetensors"), "pt") as f:
        for k in ("pos_embed", "in_blocks.0.attn.qkv.weight", "token_embedding.weight"):
            assert torch.equal(f.get_tensor(k), sd[k].half())


def test_checkpoint_config_json(model_dir):
    cfg, manifest = folders.read_manifest(model_dir)
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
    cfg, manifest = folders.read_manifest(model_dir)
    for net in NETS:
        ckpt, weights = trtllm_checkpoint.read_checkpoint(model_dir / "trtllm" / net, net)
        c = engine_build.engine_config(net, ckpt, weights, rows if net == "uvit" else rows // 2, rows // 2,
                                       None if net == "text_encoder" else latent, {}, 1.0, {})
        engine_build.write_engine(root / net, b"not really an engine", c)
    return cfg, manifest


def test_engine_contract_accepts_matching_engines(model_dir, tmp_path):
    from unidiffuser.backends.engine_folder import check_engines
    cfg, manifest = fake_engine_dir(tmp_path, model_dir)
    configs = check_engines(tmp_path, cfg, manifest, torch.float16)
    assert configs["uvit"]["max_batch_size"] == 8 and configs["uvit"]["max_images"] == 4
    check_engine_config(configs["uvit"], "uvit", cfg, rows=8, latent=(16, 16))


def test_engine_contract_errors_name_the_build_script(model_dir, tmp_path):
    from unidiffuser.backends.engine_folder import check_engines
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
    from unidiffuser.backends.engine_folder import check_engines
    cfg, manifest = fake_engine_dir(tmp_path, model_dir)
    other = json.loads(json.dumps(manifest))
    other["files"]["uvit.safetensors"]["sha256"] = "0" * 64
    with pytest.raises(EngineError, match=r"other weights.*build_uvit.py"):
        check_engines(tmp_path, cfg, other, torch.float16)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_run_py_trtllm_without_engines_fails_clearly(model_dir, tmp_path, device):
    # The engine folder is checked before the device, so this message appears on any machine.
    r = run("run.py", "--prompt", "x", "--model-dir", model_dir, "--backend", "trtllm", "--device", device,
            "--out", tmp_path / "o", "--engine-dir", tmp_path / "none")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == (f"error: {tmp_path / 'none' / 'text_encoder' / 'rank0.engine'}: no engine; "
                                                 "build it with: python build_clip.py --model-dir MODEL")


def test_uvit_checkpoint_names_the_gelu_the_torch_module_computes(model_dir):
    """config.json's hidden_act is exact erf GELU, which is what the reference MLP computes
    (and what the engine's GELU_ERF activation computes), not the tanh approximation that
    TensorRT-LLM's ACT2FN["gelu"] means."""
    from models.uvit import Mlp
    c = json.loads((model_dir / "trtllm" / "uvit" / "config.json").read_text())
    assert c["hidden_act"] == trtllm_checkpoint.UVIT_HIDDEN_ACT == "gelu_erf"
    mlp = Mlp(4, 4)
    with torch.no_grad():
        mlp.fc1.weight.copy_(torch.eye(4)), mlp.fc1.bias.zero_(), mlp.fc2.weight.copy_(torch.eye(4)), mlp.fc2.bias.zero_()
        x = torch.linspace(-3, 3, 64, dtype=torch.float64).reshape(16, 4)
        got = mlp.double()(x)
    erf = 0.5 * x * (1 + torch.erf(x / 2 ** 0.5))
    tanh = 0.5 * x * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (x + 0.044715 * x ** 3)))
    assert torch.allclose(got, erf, atol=1e-12) and not torch.allclose(got, tanh, atol=1e-5)


def test_replay_matches():
    from unidiffuser.backends.trtllm import replay_matches
    g = torch.Generator().manual_seed(0)
    out = {"a": torch.randn(2, 8, generator=g), "b": torch.randn(3, generator=g)}
    assert replay_matches({k: v.clone() for k, v in out.items()}, out)
    assert not replay_matches({**out, "a": out["a"] + 0.1}, out)
    assert not replay_matches({**out, "a": out["a"] * float("nan")}, out)
    assert not replay_matches({"a": out["a"]}, out)
    assert not replay_matches({**out, "b": out["b"][:2]}, out)


def _fake_modules(monkeypatch, **modules):
    import types
    for name, attrs in modules.items():
        m = types.ModuleType(name)
        m.__dict__.update(attrs)
        monkeypatch.setitem(sys.modules, name, m)


def test_failed_engine_build_is_an_engine_error(monkeypatch, tmp_path):
    """tensorrt_llm's Builder.build_engine asserts on a failed build; the build scripts show
    that as one EngineError line (checked here with stand-ins for tensorrt_llm)."""
    import contextlib
    from types import SimpleNamespace

    import numpy as np
    from safetensors.numpy import save_file

    class Builder:
        def create_builder_config(self, **kw):
            return None

        def create_network(self):
            return SimpleNamespace(plugin_config=SimpleNamespace(), set_named_parameters=lambda p: None)

        def build_engine(self, network, config):
            raise AssertionError("Engine building failed, please check the error log.")

    class Network:
        def named_parameters(self):
            return []

        def prepare_inputs(self, rows):
            return {}

        def __call__(self):
            pass

    _fake_modules(monkeypatch, **{"tensorrt_llm": {}, "tensorrt_llm.builder": {"Builder": Builder},
                                  "tensorrt_llm.network": {"net_guard": lambda n: contextlib.nullcontext()},
                                  "models.trtllm.common": {"load_weights": lambda m, w: None}})
    save_file({"w": np.zeros(1, np.float16)}, str(tmp_path / "rank0.safetensors"))
    with pytest.raises(EngineError, match=r"could not build the Network engine \(Engine building failed"):
        engine_build.build_serialized(Network(), tmp_path / "rank0.safetensors", 2, fused_attention=False)


def test_plugin_lib_is_stored_absolute(monkeypatch, tmp_path):
    """build_decoder.py writes --plugin-lib resolved: the runtime may start in another folder."""
    import importlib.util
    from types import SimpleNamespace
    lib = tmp_path / "build" / "libunidiffuser_plugins.so"
    lib.parent.mkdir()
    lib.write_bytes(b"")
    _fake_modules(monkeypatch, **{"models.trtllm.vae_decoder": {
        "VAEDecoder": lambda cfg, h, w, use_plugin: None, "load_group_norm_plugin": lambda path: True}})
    monkeypatch.setattr(engine_build, "build_serialized", lambda *a, **k: b"engine")
    spec = importlib.util.spec_from_file_location("build_decoder_under_test", ROOT / "build_decoder.py")
    build_decoder = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build_decoder)
    monkeypatch.chdir(tmp_path)
    args = SimpleNamespace(plugin_lib=Path("build/libunidiffuser_plugins.so"), max_batch_size=1)
    _, _, _, plugins = build_decoder.build(args, {}, None, (None, (8, 8)))
    assert plugins["plugin_lib"] == str(lib.resolve())


@pytest.mark.parametrize("script", ["build_clip.py", "build_uvit.py", "build_decoder.py"])
def test_build_script_never_writes_over_a_folder_it_did_not_make(model_dir, script):
    """--output-dir pointing at the model folder: refused before anything is built or written."""
    before = {p: p.read_bytes() for p in model_dir.glob("*.json")}
    r = run(script, "--model-dir", model_dir, "--output-dir", model_dir)
    assert r.returncode == 2 and "--output-dir" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert {p: p.read_bytes() for p in model_dir.glob("*.json")} == before
