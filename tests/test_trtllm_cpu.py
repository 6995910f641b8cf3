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


# --- the TensorRT-LLM 1.2 check (stand-ins for tensorrt_llm) ----------------------------------------

def test_trtllm_problem_accepts_only_the_1_2_line_with_its_builder():
    from unidiffuser.backends.engine_folder import TRTLLM_IMAGE, trtllm_problem
    for ok in ("1.2.0", "1.2.1", "1.2.0rc6.post3"):
        assert trtllm_problem(ok, has_builder=True) is None, ok
    for version in ("1.3.0rc5", "1.1.0", "0.21.0", "2.0.0", "(no __version__)"):
        msg = trtllm_problem(version, has_builder=True)
        assert TRTLLM_IMAGE in msg and "1.2" in msg and version in msg and "\n" not in msg, msg
    msg = trtllm_problem("1.2.0", has_builder=False)
    assert "tensorrt_llm.builder" in msg and TRTLLM_IMAGE in msg and "\n" not in msg


def test_trtllm_image_is_the_dockerfiles():
    """The check names the image the Dockerfile builds on."""
    import re
    from unidiffuser.backends.engine_folder import TRTLLM_IMAGE
    text = (ROOT / "Dockerfile").read_text()
    tag = re.search(r"^ARG TRTLLM_TAG=(\S+)$", text, re.M)[1]
    assert re.search(r"^FROM nvcr\.io/nvidia/tensorrt-llm/release:\$\{TRTLLM_TAG\}$", text, re.M)
    assert TRTLLM_IMAGE == f"nvcr.io/nvidia/tensorrt-llm/release:{tag}" and tag.startswith("1.2.")


def _fake_trtllm(monkeypatch, version, builder=True, **more):
    import importlib.machinery
    mods = {"tensorrt_llm": {"__version__": version,
                             "__spec__": importlib.machinery.ModuleSpec("tensorrt_llm", None)}}
    if builder:
        mods["tensorrt_llm.builder"] = {"Builder": object}
    mods.update(more)
    _fake_modules(monkeypatch, **mods)
    if not builder:
        monkeypatch.delitem(sys.modules, "tensorrt_llm.builder", raising=False)


@pytest.mark.parametrize("version,builder,needle", [("1.3.0rc5", True, "needs TensorRT-LLM 1.2"),
                                                    ("1.2.0", False, "has no tensorrt_llm.builder")])
def test_import_tensorrt_llm_names_the_image(monkeypatch, version, builder, needle):
    from unidiffuser.backends.engine_folder import TRTLLM_IMAGE, import_tensorrt_llm
    _fake_trtllm(monkeypatch, version, builder)
    with pytest.raises(EngineError, match=needle) as e:
        import_tensorrt_llm()
    assert TRTLLM_IMAGE in str(e.value) and "\n" not in str(e.value)
    _fake_trtllm(monkeypatch, "1.2.0")
    assert import_tensorrt_llm().__version__ == "1.2.0"


@pytest.mark.parametrize("version,builder", [("1.3.0rc5", True), ("1.2.0", False)])
def test_build_script_stops_on_another_tensorrt_llm(model_dir, tmp_path, monkeypatch, capsys, version, builder):
    """engines/build.main: one error line naming the image, exit 2, nothing built or written."""
    import build_uvit
    from unidiffuser.backends.engine_folder import TRTLLM_IMAGE
    _fake_trtllm(monkeypatch, version, builder)
    monkeypatch.setattr(engine_build, "build_serialized", lambda *a, **k: pytest.fail("built anyway"))
    assert build_uvit.main(["--model-dir", str(model_dir), "--output-dir", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: tensorrt_llm ") and TRTLLM_IMAGE in err[0]
    assert not (tmp_path / "e").exists()


# --- the runtime: TensorRT version, deserialization, the engine stream (stand-ins) ------------------

class _Trt:
    """A stand-in `tensorrt`: the data types _Engine uses and a Runtime whose deserialization
    returns `engine` (None: TensorRT could not read the plan)."""

    def __init__(self, version="10.14.1.48", engine="an engine"):
        self.__version__, self.float16, self.float32, self.int32 = version, "f16", "f32", "i32"
        self.deserialized = []
        outer = self

        class Runtime:
            def __init__(self, logger):
                pass

            def deserialize_cuda_engine(self, data):
                outer.deserialized.append(data)
                return engine
        self.Runtime = Runtime

    def module(self):
        return {k: getattr(self, k) for k in ("__version__", "float16", "float32", "int32", "Runtime")}


class _FakeSession:
    """tensorrt_llm.runtime.session.Session as _Engine uses it. from_serialized_engine fails as
    upstream's does on a plan TensorRT could not read (its _init touches None.streamable_weights_size)."""

    def __init__(self, engine=None, events=None):
        self.engine, self.events, self.ok = engine, events if events is not None else [], True

    @staticmethod
    def from_serialized_engine(data):
        raise AttributeError("'NoneType' object has no attribute 'streamable_weights_size'")

    @classmethod
    def from_engine(cls, engine):
        return cls(engine)

    def infer_shapes(self, infos, context=None):
        from types import SimpleNamespace
        return [SimpleNamespace(name="out", dtype="f16", shape=infos[0].shape)]

    def run(self, inputs, outputs, stream, context=None):
        self.events.append(("run", stream, context))
        for v in outputs.values():
            v.fill_(1)
        return self.ok


def _fake_runtime_modules(monkeypatch, trt, session_cls=_FakeSession):
    from dataclasses import dataclass
    from types import SimpleNamespace

    @dataclass
    class TensorInfo:
        name: str
        dtype: object
        shape: tuple
    _fake_trtllm(monkeypatch, "1.2.0", **{
        "tensorrt": trt.module(),
        "tensorrt_llm.logger": {"logger": SimpleNamespace(trt_logger="trt logger")},
        "tensorrt_llm.runtime": {},
        "tensorrt_llm.runtime.session": {"Session": session_cls, "TensorInfo": TensorInfo},
        "tensorrt_llm._utils": {"trt_dtype_to_torch": {"f16": torch.float16, "f32": torch.float32}.get}})


def test_check_tensorrt_version():
    from unidiffuser.backends.engine_folder import check_tensorrt_version
    check_tensorrt_version({"tensorrt_version": "10.14.1.48"}, "uvit", "10.14.1.48")
    with pytest.raises(EngineError, match=r"built with TensorRT 10\.13\.3\.9, this is TensorRT 10\.14\.1\.48.*"
                                          r"python build_uvit\.py --model-dir MODEL"):
        check_tensorrt_version({"tensorrt_version": "10.13.3.9"}, "uvit", "10.14.1.48")
    with pytest.raises(EngineError, match=r"version not recorded.*build_decoder\.py"):
        check_tensorrt_version({}, "vae_decoder", "10.14.1.48")


def _backend(model_dir, tmp_path, monkeypatch, built_with, trt):
    from unidiffuser.backends import trtllm as trtllm_backend
    cfg, manifest = fake_engine_dir(tmp_path, model_dir)
    for net in NETS:     # what build.main records
        p = tmp_path / net / "config.json"
        p.write_text(json.dumps({**json.loads(p.read_text()), "tensorrt_llm_version": "1.2.0",
                                 "tensorrt_version": built_with}))
    _fake_runtime_modules(monkeypatch, trt)
    return lambda: trtllm_backend.TrtllmBackend(model_dir, cfg, manifest, torch.device("cuda:0"), torch.float16,
                                                engine_dir=tmp_path)


def test_backend_refuses_another_tensorrt_before_deserializing(model_dir, tmp_path, monkeypatch):
    trt = _Trt("10.14.1.48")
    make = _backend(model_dir, tmp_path, monkeypatch, "10.13.3.9", trt)
    with pytest.raises(EngineError, match=r"text_encoder: built with TensorRT 10\.13\.3\.9, this is TensorRT "
                                          r"10\.14\.1\.48.*rebuild it here with: python build_clip\.py") as e:
        make()
    assert "\n" not in str(e.value) and trt.deserialized == []


def test_backend_refuses_another_tensorrt_llm(model_dir, tmp_path, monkeypatch):
    from unidiffuser.backends.engine_folder import TRTLLM_IMAGE
    make = _backend(model_dir, tmp_path, monkeypatch, "10.14.1.48", _Trt())
    _fake_trtllm(monkeypatch, "1.3.0rc5")
    with pytest.raises(EngineError, match="needs TensorRT-LLM 1.2") as e:
        make()
    assert TRTLLM_IMAGE in str(e.value)


def test_failed_deserialization_is_one_engine_error(monkeypatch, tmp_path):
    """TensorRT returns None for a plan it cannot read; upstream's Session.from_serialized_engine would
    then fail on None.streamable_weights_size. deserialize() checks it and names the build script."""
    from unidiffuser.backends.trtllm import deserialize
    (tmp_path / "rank0.engine").write_bytes(b"plan")
    _fake_runtime_modules(monkeypatch, _Trt(engine=None))
    with pytest.raises(EngineError, match=r"rank0.engine: TensorRT 10\.14\.1\.48 could not deserialize the engine.*"
                                          r"rebuild it with: python build_uvit\.py --model-dir MODEL") as e:
        deserialize(tmp_path / "rank0.engine", "uvit")
    assert "\n" not in str(e.value)

    trt = _Trt(engine="the engine")
    _fake_runtime_modules(monkeypatch, trt)
    runtime, session = deserialize(tmp_path / "rank0.engine", "uvit")
    assert session.engine == "the engine" and trt.deserialized == [b"plan"] and runtime is not None

    class NoContext(_FakeSession):
        @classmethod
        def from_engine(cls, engine):
            raise AssertionError("Failed to create an execution context!")
    _fake_runtime_modules(monkeypatch, _Trt(), NoContext)
    with pytest.raises(EngineError, match="could not create an execution context"):
        deserialize(tmp_path / "rank0.engine", "uvit")


class _Stream:
    """torch.cuda.Stream as the backend uses it, recording into `events`."""

    def __init__(self, name, events, device="cuda:0", handle=0):
        self.name, self.events, self.device, self.cuda_stream = name, events, torch.device(device), handle

    def wait_stream(self, other):
        self.events.append((self.name, "waits for", other.name))

    def synchronize(self):
        self.events.append((self.name, "synchronize"))


def _fake_cuda(monkeypatch, events):
    """The torch.cuda calls of the backend, on a machine without CUDA: one caller stream, a
    current-stream context that records, fake CUDA graphs."""
    import contextlib
    caller = _Stream("caller", events)
    current = [caller]

    @contextlib.contextmanager
    def stream(s):
        current.append(s)
        try:
            yield
        finally:
            current.pop()

    class CUDAGraph:
        def replay(self):
            events.append(("replay on", current[-1].name))

    @contextlib.contextmanager
    def graph(g, stream=None):
        events.append(("capture on", stream.name))
        current.append(stream)
        try:
            yield
        finally:
            current.pop()

    created = []

    def new_stream(device=None):
        created.append(torch.device(device))
        return _Stream("engine", events, device, handle=0x7E57)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: current[-1])
    monkeypatch.setattr(torch.cuda, "stream", stream)
    monkeypatch.setattr(torch.cuda, "device", lambda d: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "graph", graph)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", CUDAGraph)
    monkeypatch.setattr(torch.cuda, "Stream", new_stream)
    return caller, created


def test_backend_makes_one_engine_stream_on_its_device(model_dir, tmp_path, monkeypatch):
    events = []
    make = _backend(model_dir, tmp_path, monkeypatch, "10.14.1.48", _Trt())
    _, created = _fake_cuda(monkeypatch, events)
    backend = make()
    assert created == [torch.device("cuda:0")]
    assert {id(e.stream) for e in backend.engines.values()} == {id(backend.stream)}
    assert backend.stream.cuda_stream != 0          # not the legacy default stream


def test_eager_call_is_ordered_on_the_engine_stream(monkeypatch):
    """Engine stream waits for the caller's stream (inputs), the enqueue goes to the engine stream,
    the caller's stream waits for it (outputs), also when the enqueue fails."""
    from unidiffuser.backends.trtllm import _Engine
    events = []
    _fake_runtime_modules(monkeypatch, _Trt())
    _fake_cuda(monkeypatch, events)
    engine_stream = _Stream("engine", events, handle=0x7E57)
    session = _FakeSession(events=events)
    engine = _Engine(None, "text_encoder", engine_stream, "cpu", session=session)
    out = engine({"x": torch.zeros(2, 3, dtype=torch.float16)})
    assert events == [("engine", "waits for", "caller"), ("run", 0x7E57, None), ("caller", "waits for", "engine")]
    assert torch.equal(out["out"], torch.ones(2, 3, dtype=torch.float16))
    events.clear()
    session.ok = False
    with pytest.raises(EngineError, match="could not enqueue"):
        engine({"x": torch.zeros(2, 3, dtype=torch.float16)})
    assert events[-1] == ("caller", "waits for", "engine")


def test_graph_capture_and_replay_run_on_the_engine_stream(monkeypatch):
    from unidiffuser.backends.trtllm import _Engine, _Graph
    events = []
    _fake_runtime_modules(monkeypatch, _Trt())
    _fake_cuda(monkeypatch, events)

    class Context:
        def set_optimization_profile_async(self, profile, stream):
            events.append(("profile", profile, stream))
    session = _FakeSession(engine=type("E", (), {"create_execution_context": lambda self: Context()})(),
                           events=events)
    engine = _Engine(None, "uvit", _Stream("engine", events, handle=0x7E57), "cpu", session=session)
    inputs = {"x": torch.zeros(2, 3, dtype=torch.float16)}
    engine.graphed(inputs)
    capture = events[:events.index(("capture on", "engine")) + 2]
    assert capture[0] == ("engine", "waits for", "caller")
    assert [e[:2] for e in capture if e[0] in ("run", "profile")] == [("profile", 0), ("run", 0x7E57), ("run", 0x7E57)]
    assert all(e[2] is not None for e in capture if e[0] == "run")       # the shape's own context
    rest = events[len(capture):]
    assert rest[:4] == [("caller", "waits for", "engine"), ("engine", "waits for", "caller"),
                        ("replay on", "engine"), ("caller", "waits for", "engine")]
    assert isinstance(next(iter(engine.graphs.values())), _Graph)
    events.clear()
    engine.graphed(inputs)    # verified: a plain replay, ordered both ways
    assert events == [("engine", "waits for", "caller"), ("replay on", "engine"), ("caller", "waits for", "engine")]


# --- TensorRT-LLM 1.2's SM rule for fp32 accumulation in the fused attention ---------------------------

def test_fmha_fp32_acc_rule_is_plugin_configs():
    """tensorrt_llm/plugin/plugin.py (1.2) PluginConfig.validate: {100: [..., 'bert_context_fmha_fp32_acc']}."""
    assert not engine_build.fmha_fp32_acc_supported(100)
    for sm in (80, 86, 89, 90, 103, 110, 120, 121):
        assert engine_build.fmha_fp32_acc_supported(sm), sm


@pytest.mark.parametrize("sm,fp32", [(90, True), (100, False), (120, True)])
def test_build_sets_fmha_fp32_acc_where_tensorrt_llm_accepts_it(monkeypatch, tmp_path, sm, fp32):
    import contextlib
    from types import SimpleNamespace

    import numpy as np
    from safetensors.numpy import save_file

    class PluginConfig(SimpleNamespace):
        bert_context_fmha_fp32_acc = False

        def validate(self):    # as upstream's, for the one field that matters here
            if sm == 100 and self.bert_context_fmha_fp32_acc:
                raise NotImplementedError(f"bert_context_fmha_fp32_acc=True is not supported on SM {sm}.")

    configs = []

    class Builder:
        def create_builder_config(self, **kw):
            return None

        def create_network(self):
            configs.append(PluginConfig())
            return SimpleNamespace(plugin_config=configs[-1], set_named_parameters=lambda p: None)

        def build_engine(self, network, config):
            return b"engine"

    class Network:
        def named_parameters(self):
            return []

        def prepare_inputs(self, rows):
            return {}

        def __call__(self):
            pass

    _fake_modules(monkeypatch, **{"tensorrt_llm": {}, "tensorrt_llm.builder": {"Builder": Builder},
                                  "tensorrt_llm.network": {"net_guard": lambda n: contextlib.nullcontext()},
                                  "tensorrt_llm._utils": {"get_sm_version": lambda: sm},
                                  "models.trtllm.common": {"load_weights": lambda m, w: None}})
    save_file({"w": np.zeros(1, np.float16)}, str(tmp_path / "rank0.safetensors"))
    assert engine_build.build_serialized(Network(), tmp_path / "rank0.safetensors", 2, fused_attention=True) == b"engine"
    assert configs[-1].bert_context_fmha_fp32_acc is fp32 and configs[-1].bert_attention_plugin == "float16"
    assert engine_build.build_serialized(Network(), tmp_path / "rank0.safetensors", 2, fused_attention=False) == b"engine"
    assert configs[-1].bert_context_fmha_fp32_acc is False and configs[-1].bert_attention_plugin is None

    def reject(self):
        raise NotImplementedError(f"gemm_swiglu_plugin=fp8 is not supported on SM {sm}.")
    monkeypatch.setattr(PluginConfig, "validate", reject)
    with pytest.raises(EngineError, match=r"rejects the Network engine's plugin settings on this GPU \(gemm_swiglu"):
        engine_build.build_serialized(Network(), tmp_path / "rank0.safetensors", 2, fused_attention=True)
