"""Several processes under torchrun (gloo on the CPU): the same images as one process, each
written once, by the rank that owns it; a rank failing mid-run ends the run with a clear error
and leaves no half-written file. Runs the user's command, `python -m torch.distributed.run`."""
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import child_env
import torch
from PIL import Image

from unidiffuser import parallel

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a dog under the sea", "a red cube", "two birds"]
N_SAMPLES = 2
ARGS = ["--n-samples", N_SAMPLES, "--steps", 2, "--height", 32, "--width", 32, "--device", "cpu"]
for _p in PROMPTS:
    ARGS += ["--prompt", _p]


def launch(script, *args, nproc: int = 1, env: dict | None = None, timeout: float = 300):
    env = child_env(UNIDIFFUSER_ROOT=str(ROOT), **(env or {}))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    cmd = (torchrun if nproc > 1 else [sys.executable]) + [str(script), *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    base = tmp_path_factory.mktemp("tiny")
    r = launch(ROOT / "convert_weights.py", "--random", "tiny", "--src", base / "src", "--out", base / "model")
    assert r.returncode == 0, r.stderr
    return base / "model"


@pytest.fixture(scope="module")
def single(model, tmp_path_factory):
    """What one process writes."""
    out = tmp_path_factory.mktemp("single")
    r = launch(ROOT / "run.py", *ARGS, "--model-dir", model, "--out", out)
    assert r.returncode == 0, r.stderr
    return out


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path)).astype(np.int16)


def written_paths(stdout: str) -> list[str]:
    return [Path(line).name for line in stdout.splitlines() if line.endswith(".png")]


# -- the layout, as data -----------------------------------------------------------------------

def test_pairs_form_within_a_node_and_leftovers_run_solo():
    assert parallel.plan_units(["n0"] * 4) == [(0, 1), (2, 3)]
    assert parallel.plan_units(["n0"] * 3) == [(0, 1), (2,)]
    assert parallel.plan_units(["a", "a", "a", "b", "b", "b"]) == [(0, 1), (3, 4), (2,), (5,)]   # pairs first
    assert parallel.plan_units(["a", "b", "a", "b"]) == [(0, 2), (1, 3)]        # never across nodes
    assert parallel.plan_units(["n0"] * 3, cfg=False) == [(0,), (1,), (2,)]     # no guidance: all solo


@pytest.mark.parametrize("n", [0, 1, 2, 3, 5, 6, 7, 100])
def test_split_covers_every_image_once_in_proportion_to_gpus(n):
    units = parallel.plan_units(["a"] * 5 + ["b"] * 2)      # (0,1) (2,3) (5,6) (4,)
    chunks = parallel.split(n, units)
    assert [i for c in chunks for i in c] == list(range(n))  # contiguous, in order, each once
    for c, u in zip(chunks, units):
        assert abs(len(c) - n * len(u) / 7) <= 1              # a pair gets twice a solo rank's share
    if n == 1:                                                # a lone image goes to a pair, not the solo rank
        assert [len(u) for u, c in zip(units, chunks) if c] == [2]
    for nodes in (["a"] * 3, ["a", "a", "b", "c"], ["a"] * 3 + ["b"] * 3):
        assert [len(u) for u, c in zip(parallel.plan_units(nodes), parallel.split(1, parallel.plan_units(nodes))) if c] == [2]


def test_both_ranks_of_a_pair_run_the_same_batches_and_only_the_cond_rank_writes():
    units = parallel.plan_units(["a"] * 3)
    layouts = [parallel.Layout(torch.device("cpu"), 3, r, units) for r in range(3)]
    items = list(range(7))
    assert layouts[0].batches(items, 2) == layouts[1].batches(items, 2) == [[0, 1], [2, 3], [4]]
    assert layouts[2].batches(items, 2) == [[5, 6]]
    assert [lay.writer for lay in layouts] == [True, False, True]
    assert parallel.Layout().batches(items, 3) == [[0, 1, 2], [3, 4, 5], [6]]   # world size 1


def test_bad_timeout_and_device_are_refused(monkeypatch):
    monkeypatch.setenv(parallel.TIMEOUT_ENV, "soon")
    with pytest.raises(ValueError, match=parallel.TIMEOUT_ENV):
        parallel.timeout_s()
    monkeypatch.setenv(parallel.TIMEOUT_ENV, "30")
    assert parallel.timeout_s() == 30
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(ValueError, match="cuda:LOCAL_RANK"):
        parallel.init_from_env("cuda:1")
    with pytest.raises(ValueError, match="expected cuda or cpu"):
        parallel.init_from_env("meta")


# -- run.py under torchrun ---------------------------------------------------------------------

@pytest.mark.parametrize("nproc", [2, 3, 4])
def test_torchrun_writes_the_single_process_images_once(model, single, tmp_path, nproc):
    out = tmp_path / "out"
    r = launch(ROOT / "run.py", *ARGS, "--model-dir", model, "--out", out, nproc=nproc)
    assert r.returncode == 0, r.stderr[-3000:]
    want = sorted(p.name for p in single.glob("*.png"))
    assert len(want) == len(PROMPTS) * N_SAMPLES
    assert sorted(written_paths(r.stdout)) == want                      # each written exactly once
    assert sorted(p.name for p in out.iterdir()) == sorted(want + [w.replace(".png", ".json") for w in want])
    units = parallel.plan_units([0] * nproc)
    for name in want:
        a, b = pixels(single / name), pixels(out / name)
        assert np.abs(a - b).max() <= 1, name                          # fp32 on CPU: within rounding
        side = json.loads((out / name).with_suffix(".json").read_text())
        seed_index = side["seed"] - 1234
        owner = units[[seed_index in c for c in parallel.split(len(want), units)].index(True)]
        assert side["parallel"] == {"world_size": nproc, "rank": owner[0], "cfg_parallel": len(owner) == 2}
        assert side["batch"] <= N_SAMPLES


FAILING_RUN = '''
import os, sys
sys.path.insert(0, os.environ["UNIDIFFUSER_ROOT"])
import run
from unidiffuser import cli, parallel
fail_rank, fail_call = (int(v) for v in os.environ["FAIL_AT"].split(","))
calls, gather = 0, parallel.CfgPair.gather
def failing_gather(self, out):
    global calls
    calls += 1
    if self.rank == fail_rank and calls == fail_call:
        raise RuntimeError(f"injected failure on rank {self.rank}")
    return gather(self, out)
parallel.CfgPair.gather = failing_gather
cli.run(run.main)
'''


def test_a_rank_failing_mid_run_ends_all_with_a_clear_error(model, single, tmp_path, fail_rank=1):
    """The uncond rank raises in its 4th exchange (the warm-up is the 1st, 2 steps per batch: the
    second batch). Its partner, blocked in the exchange or still writing the first batch, must
    neither hang nor leave a half-written file: the run ends, non-zero, naming the failure."""
    script = tmp_path / "failing_run.py"
    script.write_text(FAILING_RUN)
    out = tmp_path / "out"
    t0 = time.monotonic()
    r = launch(script, *ARGS, "--model-dir", model, "--out", out, nproc=2,
               env={"FAIL_AT": f"{fail_rank},4", parallel.TIMEOUT_ENV: "60"}, timeout=240)
    assert r.returncode != 0
    assert time.monotonic() - t0 < 200
    assert f"injected failure on rank {fail_rank}" in r.stderr
    files = sorted(p.name for p in out.iterdir())
    assert not [f for f in files if f.startswith(".")], files          # no temporary leftovers
    pngs = [f for f in files if f.endswith(".png")]
    for name in pngs:                                                   # whatever was written is whole
        assert np.abs(pixels(single / name) - pixels(out / name)).max() <= 1
    for name in [f for f in files if f.endswith(".json")]:
        assert json.loads((out / name).read_text())["parallel"]["rank"] == 0
    assert len(pngs) <= N_SAMPLES                                       # nothing past the failure


def test_bench_cfg_parallel_runs_on_cpu(tmp_path):
    """The benchmark's two-GPU mode, as a smoke test of its code path on gloo."""
    r = launch(ROOT / "bench.py", "--cfg-parallel", "--device", "cpu", "--preset", "tiny", "--batch-sizes", 1,
               "--steps", 2, "--size", 32, "--repeats", 1, "--json", tmp_path / "cfg.json", nproc=2)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((tmp_path / "cfg.json").read_text())
    e2e = report["end_to_end"]["1"]
    assert e2e["one_gpu_ms"] > 0 and e2e["cfg_pair_ms"] > 0 and e2e["image_max_level_diff"] <= 1
    assert set(report["uvit_call_ms"]["1"]) == {"2_rows", "1_rows"}
    assert report["exchange_us"]["1"]["eager"] > 0


# -- two GPUs (NCCL, the CUDA-graphed loop with the exchange captured) --------------------------

@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices for a CFG pair over NCCL")
def test_two_gpus_fp16_graphed_match_one_gpu(model, tmp_path):
    gpu = [a if a != "cpu" else "cuda" for a in ARGS]
    one, two = tmp_path / "one", tmp_path / "two"
    r1 = launch(ROOT / "run.py", *gpu, "--model-dir", model, "--out", one)
    r2 = launch(ROOT / "run.py", *gpu, "--model-dir", model, "--out", two, nproc=2)
    assert r1.returncode == 0 and r2.returncode == 0, r1.stderr[-2000:] + r2.stderr[-3000:]
    names = sorted(p.name for p in one.glob("*.png"))
    assert names == sorted(p.name for p in two.glob("*.png")) and len(names) == len(PROMPTS) * N_SAMPLES
    for name in names:     # fp16: the pair's UViT runs B rows where one GPU runs 2B (other GEMM tiles)
        d = np.abs(pixels(one / name) - pixels(two / name))
        assert d.mean() < 0.5 and d.max() <= 8, (name, d.mean(), d.max())
        assert json.loads((two / name).with_suffix(".json").read_text())["parallel"]["cfg_parallel"] is True
