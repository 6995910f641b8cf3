"""The memory estimate (memory.py) against what a request really takes: the peak resident size
(VmHWM) a request adds to a loaded CPU process, over a grid of sizes and batches, must stay under
the estimate; and an allocation that fails anyway is one line, exit 2, nothing written."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import child_env, tiny_model_folder

from models.config import PRESETS
from unidiffuser import cli, memory

ROOT = Path(__file__).resolve().parents[1]

# Each request runs in a loaded process: the peak is reset before it (clear_refs 5, Linux >= 4.0,
# after malloc_trim so that what earlier requests left free is given back) and read after it.
MEASURE = r'''
import ctypes, json, sys
import torch
from unidiffuser import UniDiffuser
from unidiffuser.tasks import MODES

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

def reset():
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return status("VmRSS")

pipe = UniDiffuser.load(sys.argv[1], device="cpu", dtype="fp32")
pipe("x", steps=1, height=32, width=32)              # first-call work (thread pools, kernels) is not a request's
for kind, b, h, w, steps in json.loads(sys.argv[2]):
    base = reset()
    if kind == "noise":                              # what a request allocates before sampling
        f = pipe.pipeline.cfg.vae_decoder.downsample
        gens = [torch.Generator().manual_seed(s) for s in range(b)]
        kept = pipe.pipeline.initial_noise(MODES["t2i"], gens, steps, pipe.pipeline.shapes(h // f, w // f))
    else:
        kept = pipe("x", n=b, steps=steps, height=h, width=w)
    print(json.dumps({"kind": kind, "b": b, "h": h, "w": w, "steps": steps,
                      "growth": status("VmHWM") - base}), flush=True)
    del kept
'''

GRID = [("request", 1, 64, 64, 2), ("request", 16, 64, 64, 2), ("request", 2, 128, 128, 2),
        ("request", 8, 128, 128, 2), ("request", 1, 192, 192, 2), ("request", 2, 256, 256, 2),
        ("request", 1, 384, 384, 1), ("noise", 8, 32, 32, 1000), ("noise", 64, 32, 32, 200)]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_model_folder(tmp_path_factory)


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux's /proc/self/clear_refs")
def test_peak_rss_of_a_request_stays_under_the_estimate(model):
    r = subprocess.run([sys.executable, "-c", MEASURE, str(model), json.dumps(GRID)], capture_output=True, text=True,
                       env=child_env(), cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(rows) == len(GRID)
    cfg, report = PRESETS["tiny"], []
    for row in rows:
        e = memory.estimate(cfg, row["b"], row["h"], row["w"], "fp32", 0, row["steps"], cpu=True)
        report.append(f"{row['kind']} {row['b']}x{row['h']}x{row['w']} {row['steps']} steps: "
                      f"measured {row['growth'] / 2**20:.1f} MiB, estimated {e.total / 2**20:.1f} MiB")
    for row, line in zip(rows, report):
        e = memory.estimate(cfg, row["b"], row["h"], row["w"], "fp32", 0, row["steps"], cpu=True)
        assert row["growth"] <= e.total, "\n".join(report)
    # The grid is large enough that the activations, not the allocator's constant, decide.
    big = [row for row in rows if row["growth"] > 2 * memory.CPU_SLACK]
    assert len(big) >= 3, "\n".join(report)


def test_noise_drawn_up_front_is_counted_twice_on_the_cpu():
    """pipeline.initial_noise draws each image's noise, then stacks it: both are live at once."""
    cfg = PRESETS["v1"]
    u = cfg.uvit
    noise = 4 * 4096 * 1000 * u.num_text_tokens * u.text_dim
    gpu = memory.estimate(cfg, 4096, 16, 16, "fp16", 0, 1000)
    cpu = memory.estimate(cfg, 4096, 16, 16, "fp32", 0, 1000, cpu=True)
    assert gpu.solver >= noise and cpu.solver >= 2 * noise


def test_cgroup_limit_counts(tmp_path):
    (tmp_path / "memory.max").write_text("1073741824\n")
    (tmp_path / "memory.current").write_text("536870912\n")
    (tmp_path / "memory.stat").write_text("anon 1\ninactive_file 268435456\n")
    assert memory.cgroup_available(str(tmp_path)) == (512 + 256) << 20
    assert memory.cpu_available(str(tmp_path)) <= (512 + 256) << 20
    (tmp_path / "memory.max").write_text("max\n")
    assert memory.cgroup_available(str(tmp_path)) is None


# -- an allocation that fails anyway --------------------------------------------------------------

def oom(kind):
    if kind == "cuda":
        return torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (GPU 0; 79.1 GiB total)")
    if kind == "cpu":
        return RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: "
                            "you tried to allocate 21474836480 bytes. Error code 12 (Cannot allocate memory)")
    return MemoryError()


@pytest.mark.parametrize("kind", ["cuda", "cpu", "python"])
@pytest.mark.parametrize("stage", ["loading", "generating"])
def test_allocation_failure_is_one_line_and_nothing_is_written(model, tmp_path, monkeypatch, capsys, kind, stage):
    import run
    from unidiffuser.api import UniDiffuser

    def fail(*args, **kwargs):
        raise oom(kind)

    if stage == "loading":
        monkeypatch.setattr(UniDiffuser, "from_options", classmethod(lambda cls, *a, **k: fail()))
    else:
        monkeypatch.setattr(UniDiffuser, "generate", fail)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        cli.run(lambda: run.main(["--prompt", "x", "--model-dir", str(model), "--out", str(out), "--steps", "1",
                                  "--height", "64", "--width", "64", "--n-samples", "2", "--device", "cpu"]), run.FLAGS)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    if stage == "loading":
        assert "out of memory while loading the networks" in lines[0]
    else:
        assert "out of memory while generating 2 sample(s) of 64x64" in lines[0]
        assert "what would fit" in lines[0] and "RAM" in lines[0]
    assert not out.exists() or os.listdir(out) == []


def test_a_runtime_error_that_is_not_out_of_memory_is_not_taken_for_one():
    assert memory.out_of_memory(oom("cuda")) and memory.out_of_memory(oom("cpu")) and memory.out_of_memory(MemoryError())
    assert not memory.out_of_memory(RuntimeError("shape mismatch")) and not memory.out_of_memory(ValueError("out of memory"))
