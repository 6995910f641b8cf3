"""run.py under torchrun (gloo on the CPU) when a rank refuses: every rank ends promptly, with no
traceback of ours, one error line (from rank 0, or from the one rank that failed), torchrun's
exit code non-zero, and nothing written."""
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import child_env, tiny_model_folder

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["--prompt", "x", "--n-samples", 2, "--steps", 2, "--height", 32, "--width", 32, "--device", "cpu"]


def torchrun(script, *args, nproc=2, env=None):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           str(script), *map(str, args)]
    t0 = time.monotonic()
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=240,
                       env=child_env(UNIDIFFUSER_ROOT=str(ROOT), UNIDIFFUSER_DIST_TIMEOUT_S="120", **(env or {})))
    r.seconds = time.monotonic() - t0
    return r


def our_tracebacks(stderr: str) -> list[str]:
    """Tracebacks other than torchrun's own (it reports a failed rank with one, from its frames only)."""
    found = []
    for chunk in stderr.split("Traceback (most recent call last):")[1:]:
        frames = [line for line in chunk.splitlines() if line.startswith('  File "')]
        if any("torch/distributed/" not in f and "<frozen runpy>" not in f for f in frames):
            found.append(chunk[:2000])
    return found


def refused_once(r, *names):
    assert r.returncode != 0, r.stderr[-3000:]
    assert r.seconds < 90, r.seconds                 # no rank waited for a collective's timeout
    assert not our_tracebacks(r.stderr), our_tracebacks(r.stderr)
    lines = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, r.stderr[-4000:]
    for name in names:
        assert name in lines[0], (name, lines[0])
    assert "exitcode  : 2" in r.stderr                # each rank ended through cli.run, not by a signal or crash


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_model_folder(tmp_path_factory)


@pytest.mark.parametrize("nproc", [2, 3])   # a CFG pair; a pair and a lone rank
def test_rank_0_refusing_existing_outputs_stops_every_rank(model, tmp_path, nproc):
    """Only the writing ranks look at --out; the others would go on to load and then wait for
    their partner in the first exchange."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "x_seed1234.png").write_text("the user's own file")
    r = torchrun(ROOT / "run.py", *ARGS, "--model-dir", model, "--out", out, nproc=nproc)
    refused_once(r, "x_seed1234.png", "--overwrite")
    assert sorted(p.name for p in out.iterdir()) == ["x_seed1234.png"]
    assert (out / "x_seed1234.png").read_text() == "the user's own file"


def test_an_argument_error_is_said_once(model, tmp_path):
    r = torchrun(ROOT / "run.py", *ARGS, "--model-dir", model, "--out", tmp_path / "out", "--steps", 0)
    refused_once(r, "--steps")


def test_a_model_folder_error_is_said_once(tmp_path):
    r = torchrun(ROOT / "run.py", *ARGS, "--model-dir", tmp_path / "nowhere", "--out", tmp_path / "out")
    refused_once(r, "nowhere", "convert_weights.py")
    assert not (tmp_path / "out").exists()           # refused before --out is even made


FAIL_ON_RANK_1 = '''
import os, sys
sys.path.insert(0, os.environ["UNIDIFFUSER_ROOT"])
import run
from unidiffuser import cli, runs
from unidiffuser.api import UniDiffuser
where = os.environ["FAIL_IN"]
def fail(*args, **kwargs):
    raise ValueError(f"rank {os.environ['RANK']}: injected refusal in {where}")
if os.environ["RANK"] == "1":
    if where == "checks":
        runs.check_memory = fail
    else:
        UniDiffuser.from_options = classmethod(lambda cls, *a, **k: fail())
cli.run(run.main, run.FLAGS)
'''


@pytest.mark.parametrize("where", ["checks", "loading"])
def test_only_the_failing_rank_speaks(model, tmp_path, where):
    """Rank 1 alone refuses; rank 0 (its CFG partner, the writer) stops too, silently."""
    script = tmp_path / "fail_on_rank_1.py"
    script.write_text(FAIL_ON_RANK_1)
    out = tmp_path / "out"
    r = torchrun(script, *ARGS, "--model-dir", model, "--out", out, env={"FAIL_IN": where})
    refused_once(r, f"rank 1: injected refusal in {where}")
    assert not list(out.iterdir())
