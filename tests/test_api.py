"""The Python API (load once, generate many) and the load path under it, on the CPU with the
tiny preset: reproducible by seed, PIL images of the asked size, timings, the same pixels as
run.py, clear errors; networks filled straight from the files; one graph capture per shape."""
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import child_env
import torch
from PIL import Image

from unidiffuser import UniDiffuser, pipeline
from unidiffuser.backends import torch_backend

from unidiffuser.weights import folders, loading

ROOT = Path(__file__).resolve().parents[1]


def cli(script, *args):
    env = child_env()
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=ROOT)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    base = tmp_path_factory.mktemp("tiny")
    r = cli("convert_weights.py", "--random", "tiny", "--src", base / "src", "--out", base / "model")
    assert r.returncode == 0, r.stderr
    return base / "model"


@pytest.fixture(scope="module")
def pipe(model):
    return UniDiffuser.load(model, device="cpu")


def pixels(img) -> np.ndarray:
    return np.asarray(img.convert("RGB"))


def test_generate_twice_reproduces_by_seed(pipe):
    a = pipe("a red cube", seed=7, n=2, steps=3, height=64, width=96)
    b = pipe("a red cube", seed=7, n=2, steps=3, height=64, width=96)
    c = pipe("a red cube", seed=8, n=1, steps=3, height=64, width=96)
    assert len(a.images) == 2 and a.seeds == [7, 8] and a.prompts == ["a red cube"] * 2
    for img in a.images:
        assert isinstance(img, Image.Image) and img.size == (96, 64) and img.mode == "RGB"
    assert all(np.array_equal(pixels(x), pixels(y)) for x, y in zip(a.images, b.images))
    assert not np.array_equal(pixels(a.images[0]), pixels(a.images[1]))      # seeds 7 and 8 in one batch
    assert not np.array_equal(pixels(a.images[0]), pixels(c.images[0]))      # seed 7 vs 8
    assert {"encode_s", "sample_s", "decode_s", "total_s"} <= set(a.timings)
    assert all(v >= 0 for v in a.timings.values()) and a.timings["total_s"] > 0
    assert set(pipe.load_timings) >= {"load_s"} and pipe.load_timings["load_s"] > 0


def test_list_of_prompts_and_explicit_seeds(pipe, tmp_path):
    out = pipe(["a dog", "a cat"], seeds=[3, 11], steps=2, height=32, width=32)
    assert out.prompts == ["a dog", "a cat"] and out.seeds == [3, 11]
    alone = pipe("a cat", seed=11, steps=2, height=32, width=32)
    assert np.array_equal(pixels(out.images[1]), pixels(alone.images[0]))
    paths = out.save(tmp_path / "saved")
    assert [p.name for p in paths] == ["a-dog_seed3.png", "a-cat_seed11.png"]
    side = json.loads(paths[1].with_suffix(".json").read_text())
    assert side["prompt"] == "a cat" and side["seed"] == 11 and side["steps"] == 2 and side["dtype"] == "fp32"


def test_same_pixels_as_run_py(pipe, model, tmp_path):
    r = cli("run.py", "--prompt", "a dog under the sea", "--n-samples", "2", "--seed", "5", "--model-dir", model,
            "--steps", "3", "--height", "48", "--width", "64", "--out", tmp_path)
    assert r.returncode == 0, r.stderr
    out = pipe("a dog under the sea", seed=5, n=2, steps=3, height=48, width=64)
    for img, seed in zip(out.images, out.seeds):
        written = Image.open(tmp_path / f"a-dog-under-the-sea_seed{seed}.png")
        assert np.array_equal(pixels(written), pixels(img))


@pytest.mark.parametrize("kwargs, message", [   # messages name the API's parameters (run.py spells them as flags)
    (dict(prompt=[]), "prompt must be a string or a non-empty list of strings"),
    (dict(prompt="x", n=0), "n must be in 1..4096, got 0"),
    (dict(prompt="x", height=40), "height must be a positive multiple of 16"),
    (dict(prompt="x", steps=0), "steps must be in 1..1000"),
    (dict(prompt=["x", "y"], seeds=[1]), "one per sample"),
    (dict(prompt="x", scale=float("nan")), "scale must be a finite number"),
    (dict(prompt="x", seed=2**64 - 1, n=2), r"seed: every image's seed must be an integer in \[0, 2\*\*64\)"),
    (dict(prompt="x", seeds=[-1]), "seeds: every image's seed"),
    (dict(prompt=["x", "y"], batch=0), "batch must be in 1..4096, got 0"),
    (dict(prompt="x", seeds=[1.9]), "seeds: every image's seed must be an integer.*got 1.9"),
    (dict(prompt="x", seed="1"), "seed: every image's seed must be an integer.*got '1'"),
])
def test_bad_arguments_raise_value_error(pipe, kwargs, message):
    with pytest.raises(ValueError, match=message):
        pipe(**kwargs)


@pytest.mark.parametrize("kwargs, message", [
    (dict(prompt=None), "prompt must be a string.*got None"),
    (dict(prompt=123), "prompt must be a string.*got 123"),
    (dict(prompt="x", steps="50"), "steps must be an integer in 1..1000, got '50'"),
    (dict(prompt="x", scale="7"), "scale must be a finite number, got '7'"),
    (dict(prompt="x", height=512.0), "height must be a positive multiple of 16.*got 512.0"),
])
def test_wrong_types_raise_type_error_naming_the_parameter(pipe, kwargs, message):
    """A wrong type is a TypeError (and a ValueError, so one except clause takes every bad input)
    that names the parameter and shows the value as given."""
    with pytest.raises(TypeError, match=message) as e:
        pipe(**kwargs)
    assert isinstance(e.value, ValueError)


def test_load_errors_are_value_errors(tmp_path):
    with pytest.raises(ValueError, match="model folder not found"):
        UniDiffuser.load(tmp_path / "nothing", device="cpu")
    with pytest.raises(ValueError, match="backend must be one of"):
        UniDiffuser.load(tmp_path, device="cpu", backend="onnx")


def test_networks_filled_from_files_in_target_dtype(model):
    """Built on the meta device, every parameter comes from the file, cast once to the dtype."""
    cfg, manifest = folders.read_manifest(model)
    nets = loading.load_networks(model, cfg, manifest, "cpu", torch.bfloat16)
    for name, net in nets.items():
        sd = loading.load_network(model, name, cfg, manifest)
        tensors = dict(net.named_parameters()) | dict(net.named_buffers())
        assert set(tensors) == set(sd)
        for k, t in tensors.items():
            assert not t.is_meta and t.device.type == "cpu" and t.dtype == torch.bfloat16, k
            assert torch.equal(t, sd[k].to(torch.bfloat16)), k


def test_truncated_file_is_a_clear_error(model, tmp_path):
    import shutil
    bad = shutil.copytree(model, tmp_path / "m")
    path = bad / "vae_decoder.safetensors"
    path.write_bytes(path.read_bytes()[:1000])
    cfg, manifest = folders.read_manifest(bad)
    with pytest.raises(folders.CheckpointError, match="vae_decoder.safetensors: sha256 does not match"):
        loading.load_networks(bad, cfg, manifest, "cpu", torch.float32)
    # Unverified, the broken layout itself is reported.
    with pytest.raises(folders.CheckpointError, match="not a readable safetensors file"):
        loading.load_network(bad, "vae_decoder", cfg, manifest, verify=False)


def test_one_capture_per_shape_across_prompts(pipe, monkeypatch):
    """A --prompts-file of many prompts pays the capture of the model evaluation once per batch,
    size and scale; other step counts reuse it. The CUDA graph is replaced by a stand-in that
    replays the captured function from the same static buffers (no GPU); the cache, its key and
    the copies into the graph's inputs are the real ones, so the images must equal eager ones."""
    captures = []

    class Replay:
        def __init__(self, fn, out):
            self.fn, self.out = fn, out

        def replay(self):
            self.out.copy_(self.fn())

    def capture(fn):
        out = fn()
        captures.append(out.shape)
        return Replay(fn, out), out

    t2i = pipe.pipeline
    eager = pipe(["a", "b"], seed=1, steps=3, height=32, width=32)
    eager_2_steps = pipe(["a"], seed=1, steps=2, height=32, width=32)
    monkeypatch.setattr(pipeline, "capture_graph", capture)
    monkeypatch.setattr(t2i.backend, "graph_safe", True, raising=False)
    monkeypatch.setattr(t2i, "_graphs", {})
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    out = pipe(["a", "b", "a much longer prompt about the sea"], seed=1, steps=3, height=32, width=32)
    assert len(captures) == 1
    assert all(np.array_equal(pixels(x), pixels(y)) for x, y in zip(eager.images, out.images))
    assert "capture_s" in out.timings
    again = pipe(["a"], seed=1, steps=2, height=32, width=32)      # other steps: the same graph
    assert len(captures) == 1 and "capture_s" not in again.timings
    assert np.array_equal(pixels(again.images[0]), pixels(eager_2_steps.images[0]))
    pipe(["c"], seed=1, n=2, steps=2, height=32, width=32)       # another batch size: a new capture
    pipe(["c"], seed=1, steps=2, height=32, width=48)           # another size
    pipe(["c"], seed=1, steps=2, height=32, width=32, scale=3.0)   # another scale
    assert len(captures) == 4 and len(t2i._graphs) == 4


@pytest.mark.gpu
def test_gpu_capture_once_for_many_prompts(model, caplog):
    """On the CUDA-graph fast path: three prompts of one batch size, one capture, logged with its
    time; the second request reports no capture time."""
    gpu = UniDiffuser.load(model, device="cuda", dtype="fp16")
    with caplog.at_level("INFO", logger="unidiffuser"):
        first = gpu("a red cube", seed=1, steps=4)
        rest = gpu(["a dog", "a cat"], seed=2, steps=4)
    assert len(gpu.pipeline._graphs) == 1
    assert sum("captured the UViT call" in r.getMessage() for r in caplog.records) == 1
    assert first.timings["capture_s"] > 0 and "capture_s" not in rest.timings
    again = gpu("a red cube", seed=1, steps=4)
    assert np.array_equal(pixels(first.images[0]), pixels(again.images[0]))


def test_batches_may_mix_prompts_and_give_the_same_pixels(pipe):
    """batch= groups images across prompts (run.py's CFG pairs and data parallel do); each image
    still depends only on its prompt and seed."""
    one = pipe(["a red cube", "a blue ball"], seeds=[3, 4], steps=2, height=32, width=32)          # a batch per prompt
    mixed = pipe(["a red cube", "a blue ball"], seeds=[3, 4], steps=2, height=32, width=32, batch=2)
    assert mixed.settings["batch"] == 2 and len(mixed.images) == 2
    for a, b in zip(one.images, mixed.images):
        assert np.abs(pixels(a).astype(int) - pixels(b).astype(int)).max() <= 1


def test_save_never_replaces_an_image_unless_asked(pipe, tmp_path):
    out = pipe("a red cube", seed=9, steps=1, height=32, width=32)
    png, = out.save(tmp_path)
    side = json.loads(png.with_suffix(".json").read_text())
    assert side["seed"] == 9 and side["png_sha256"] == hashlib.sha256(png.read_bytes()).hexdigest()
    png.write_bytes(b"the user's own file")
    with pytest.raises(FileExistsError, match="not replaced without --overwrite"):
        out.save(tmp_path)
    assert png.read_bytes() == b"the user's own file"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([png.name, png.with_suffix(".json").name])
    out.save(tmp_path, overwrite=True)
    assert Image.open(png).size == (32, 32)


def test_fp8_refused_before_loading_on_a_gpu_without_fp8_units(model, monkeypatch):
    """An A100 (sm_80) has no e4m3 matrix units: a clear error, before any weights are read."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    monkeypatch.setattr(torch_backend, "load_networks", lambda *a, **k: pytest.fail("weights were read"))
    with pytest.raises(ValueError, match="fp8 needs a GPU with fp8 matrix units.*A100.*use fp16"):
        UniDiffuser.load(model, device="cuda", dtype="fp8")


def test_compile_on_the_cpu_refused_before_loading(model, monkeypatch):
    monkeypatch.setattr(torch_backend, "load_networks", lambda *a, **k: pytest.fail("weights were read"))
    with pytest.raises(ValueError, match="compile needs device cuda"):
        UniDiffuser.load(model, device="cpu", compile=True)


def test_warm_up_thread_runs_the_fast_kernels_without_error(caplog, monkeypatch):
    """The warm-up thread (started while the weights load on the CUDA fast path) must run its
    block, convolutions and fused kernels to the end: a failure would only be logged at debug
    level, so a broken warm-up would silently cost the first image its head start. On the CPU
    it runs the same modules; the plugin is skipped there even where it is built (as here)."""
    from models import groupnorm
    from models.config import PRESETS
    monkeypatch.setattr(groupnorm, "available", lambda: True)
    with caplog.at_level("DEBUG", logger="unidiffuser"):
        from unidiffuser.backends.warmup import warm_up_in_background
        thread = warm_up_in_background(PRESETS["tiny"], torch.device("cpu"), torch.float32)
        thread.join(timeout=120)
    assert not thread.is_alive()
    assert not [r for r in caplog.records if "warm-up thread" in r.getMessage()]


def test_guidance_that_overflows_is_refused_not_written(pipe, tmp_path):
    """A huge finite scale overflows inside sampling; the clamp would make a black PNG of it."""
    with pytest.raises(ValueError, match=r"non-finite values \(inf/NaN\) with scale 1e\+30.*smaller scale"):
        pipe("x", scale=1e30, steps=3)
    out = pipe("x", scale=7.0, steps=3)                   # the pipeline is fine afterwards
    assert pixels(out.images[0]).std() > 0


def test_save_is_all_or_nothing(pipe, tmp_path):
    """One existing name refuses the whole call: no image of it is written."""
    out = pipe("a fox", n=3, steps=2)
    taken = tmp_path / f"a-fox_seed{out.seeds[2]}.png"
    taken.write_bytes(b"the user's own file")
    with pytest.raises(FileExistsError, match=taken.name):
        out.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [taken.name]
    assert taken.read_bytes() == b"the user's own file"
    assert len(out.save(tmp_path, overwrite=True)) == 3 and len(list(tmp_path.glob("*.json"))) == 3
