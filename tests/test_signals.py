"""Stopped at any moment (SIGTERM, SIGINT, SIGHUP), a command leaves no temporary file and no
partial folder of its own, in --out, beside the model folder or in the temporary directory, and
exits 128 + the signal's number without a traceback. Killed with SIGKILL it cannot clean up: the
next run removes what it left (and only that), in one log line.

The signals are sent at real moments of real runs on tiny weights, found by watching the run
(its log, its progress bar, its temporary files appearing), and retried when the run was faster
than the watcher."""
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import child_env, tiny_model_folder
from PIL import Image

from unidiffuser import cli, files, lifecycle

ROOT = Path(__file__).resolve().parents[1]


class Watched:
    """A command started in the background; its stdout and stderr are collected as they come."""

    def __init__(self, script, *args, tmpdir: Path):
        tmpdir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen([sys.executable, str(ROOT / script), *map(str, args)], cwd=ROOT,
                                     env=child_env(TMPDIR=str(tmpdir)), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.out, self.err = bytearray(), bytearray()
        self.readers = [threading.Thread(target=self._read, args=(s, b), daemon=True)
                        for s, b in ((self.proc.stdout, self.out), (self.proc.stderr, self.err))]
        for t in self.readers:
            t.start()

    @staticmethod
    def _read(stream, buf):
        while chunk := os.read(stream.fileno(), 65536):
            buf += chunk

    def wait(self, timeout=300):
        code = self.proc.wait(timeout)
        for t in self.readers:
            t.join(10)
        return code

    @property
    def stderr(self) -> str:
        return self.err.decode(errors="replace")

    @property
    def stdout(self) -> str:
        return self.out.decode(errors="replace")


def marked(folder: Path) -> list[str]:
    """Entries of ours (lifecycle's mark) in folder, recursively."""
    if not folder.exists():
        return []
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if lifecycle.parse(p.name))


def signal_when(script, args, moment, tmpdir: Path, sig=signal.SIGTERM, tries=6) -> Watched:
    """Start the command, send `sig` as soon as moment(run) holds; retried when the run ended first."""
    for _ in range(tries):
        run = Watched(script, *args, tmpdir=tmpdir)
        deadline = time.monotonic() + 240
        while run.proc.poll() is None and not moment(run) and time.monotonic() < deadline:
            time.sleep(0.0002)
        if run.proc.poll() is None:
            run.proc.send_signal(sig)
            run.wait()
            return run
        run.wait()
        cleanup = getattr(moment, "reset", None)
        if cleanup:
            cleanup()
    pytest.fail(f"{script} always ended before the moment to signal it came")


def no_leftovers(*folders: Path) -> None:
    for f in folders:
        assert marked(f) == [], (f, marked(f))


def stopped(run: Watched, sig=signal.SIGTERM) -> None:
    assert run.proc.returncode == 128 + sig, (run.proc.returncode, run.stderr[-3000:])
    assert "Traceback" not in run.stderr, run.stderr[-3000:]
    want = "interrupted" if sig == signal.SIGINT else f"stopped by {signal.Signals(sig).name}"
    assert want in run.stderr, run.stderr[-2000:]


def whole_pairs(out: Path) -> None:
    """Whatever --out holds is complete: each PNG readable and with its sidecar, nothing hidden."""
    if not out.exists():
        return
    names = sorted(p.name for p in out.iterdir())
    assert not [n for n in names if n.startswith(".")], names
    pngs, jsons = {n[:-4] for n in names if n.endswith(".png")}, {n[:-5] for n in names if n.endswith(".json")}
    assert pngs == jsons, names
    for n in pngs:
        Image.open(out / f"{n}.png").load()


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_model_folder(tmp_path_factory)


# -- run.py -------------------------------------------------------------------------------------

def run_args(model, out, *extra):
    return ["--prompt", "a dog", "--model-dir", model, "--out", out, "--device", "cpu", *extra]


def test_run_stopped_while_loading(model, tmp_path):
    out, tmp = tmp_path / "out", tmp_path / "tmp"
    run = signal_when("run.py", run_args(model, out, "--steps", 5, "--height", 32, "--width", 32),
                      lambda r: b"RANDOM weights" in r.err, tmp)          # logged as loading begins
    stopped(run)
    whole_pairs(out)
    no_leftovers(out, tmp)
    assert not list(out.glob("*.png"))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_run_stopped_while_sampling(model, tmp_path, sig):
    out, tmp = tmp_path / "out", tmp_path / "tmp"
    run = signal_when("run.py", run_args(model, out, "--steps", 200, "--height", 64, "--width", 64),
                      lambda r: b"step/s" in r.err, tmp, sig=sig)          # the progress bar moves
    stopped(run, sig)
    no_leftovers(out, tmp)
    assert not list(out.iterdir())


def test_run_stopped_while_writing(model, tmp_path):
    """SIGTERM as soon as a temporary PNG or sidecar of the run appears in --out (or the first
    image is out, the others still being written): every pair published is whole, nothing else."""
    out, tmp = tmp_path / "out", tmp_path / "tmp"

    def writing(r):
        return bool(marked(out)) or b".png" in r.out

    def reset():
        import shutil
        shutil.rmtree(out, ignore_errors=True)

    writing.reset = reset
    run = signal_when("run.py", run_args(model, out, "--steps", 1, "--n-samples", 8, "--height", 128, "--width", 128),
                      writing, tmp)
    stopped(run)
    whole_pairs(out)
    no_leftovers(out, tmp)
    assert len(list(out.glob("*.png"))) < 8


def test_run_killed_while_writing_is_swept_by_the_next_run(model, tmp_path):
    """SIGKILL runs no clean-up: the temporary file stays. The next run into --out removes it,
    says so in one line, and touches nothing else (a user's hidden file, another host's file,
    a live process's file)."""
    out, tmp = tmp_path / "out", tmp_path / "tmp"
    out.mkdir()
    mine = out / ".mine.png.unidiffuser-tmp-notes"
    mine.write_text("the user's own file")
    other_host = out / f".x.png.unidiffuser-tmp-00000000-{os.getpid()}-1-abcdef12.png"
    other_host.write_text("another machine's run, on a shared folder")
    live = out / f".y.png.unidiffuser-tmp-{lifecycle.HOST}-{os.getpid()}-{lifecycle.start_ticks(os.getpid())}-abcdef12.png"
    live.write_text("this test process is alive")
    run = signal_when("run.py", run_args(model, out, "--steps", 1, "--n-samples", 8, "--height", 128, "--width", 128),
                      lambda r: any(lifecycle.parse(n) and lifecycle.parse(n)["pid"] == str(r.proc.pid)
                                    for n in os.listdir(out)), tmp, sig=signal.SIGKILL)
    assert run.proc.returncode == -signal.SIGKILL
    left = [n for n in os.listdir(out) if lifecycle.parse(n) and lifecycle.parse(n)["pid"] == str(run.proc.pid)]
    assert left                                          # what a killed run leaves
    again = subprocess.run([sys.executable, str(ROOT / "run.py"), *map(str, run_args(model, out, "--steps", 1,
                            "--height", 32, "--width", 32, "--seed", 99))], capture_output=True, text=True,
                           cwd=ROOT, env=child_env(TMPDIR=str(tmp)))
    assert again.returncode == 0, again.stderr
    lines = [line for line in again.stderr.splitlines() if "cleaned up after stopped runs" in line]
    assert len(lines) == 1 and all(n in lines[0] for n in left), again.stderr
    assert not [n for n in os.listdir(out) if lifecycle.parse(n) and lifecycle.parse(n)["pid"] == str(run.proc.pid)]
    assert mine.read_text() == "the user's own file" and other_host.exists() and live.exists()


# -- convert_weights.py -------------------------------------------------------------------------

def convert_args(out, *extra):
    return ["--random", "tiny", "--out", out, *extra]


@pytest.mark.parametrize("moment", ["writing originals", "reading originals", "writing the model folder"])
def test_convert_stopped(tmp_path, moment):
    parent, tmp = tmp_path / "parent", tmp_path / "tmp"
    parent.mkdir()
    out = parent / "model"
    when = {"writing originals": lambda r: bool(marked(tmp)),                     # the scratch originals
            "reading originals": lambda r: b"reading " in r.err,
            "writing the model folder": lambda r: bool(marked(parent))}[moment]   # .model.unidiffuser-tmp-...
    run = signal_when("convert_weights.py", convert_args(out), when, tmp)
    stopped(run)
    no_leftovers(parent, tmp)
    assert os.listdir(parent) in ([], ["model"])
    if os.listdir(parent):                               # it finished the swap before the signal ran
        assert (out / "manifest.json").is_file()


def test_convert_overwrite_stopped_keeps_the_old_folder(tmp_path):
    parent, tmp = tmp_path / "parent", tmp_path / "tmp"
    out = parent / "model"
    first = subprocess.run([sys.executable, str(ROOT / "convert_weights.py"), *map(str, convert_args(out))],
                           capture_output=True, text=True, cwd=ROOT, env=child_env(TMPDIR=str(tmp)))
    assert first.returncode == 0, first.stderr
    before = {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    run = signal_when("convert_weights.py", convert_args(out, "--overwrite", "--seed", 3),
                      lambda r: bool(marked(parent)), tmp)
    stopped(run)
    no_leftovers(parent, tmp)
    assert os.listdir(parent) == ["model"]
    after = {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before or after.keys() == before.keys()   # the old folder, or the whole new one


def test_convert_killed_is_swept_by_the_next_run(tmp_path):
    parent, tmp = tmp_path / "parent", tmp_path / "tmp"
    parent.mkdir()
    out = parent / "model"
    run = signal_when("convert_weights.py", convert_args(out), lambda r: bool(marked(parent)) or bool(marked(tmp)),
                      tmp, sig=signal.SIGKILL)
    assert run.proc.returncode == -signal.SIGKILL
    left = marked(parent) + marked(tmp)
    left = [n for n in left if os.sep not in n]
    assert left
    again = subprocess.run([sys.executable, str(ROOT / "convert_weights.py"), *map(str, convert_args(out))],
                           capture_output=True, text=True, cwd=ROOT, env=child_env(TMPDIR=str(tmp)))
    assert again.returncode == 0, again.stderr
    assert "cleaned up after stopped runs" in again.stderr
    no_leftovers(parent, tmp)
    assert os.listdir(parent) == ["model"]


# -- the mechanism, in this process ---------------------------------------------------------------

def test_a_signal_while_writing_removes_the_temporary_file(tmp_path, capsys):
    """cli.run: SIGTERM arriving inside a write (here sent by the write itself) removes the
    temporary file, prints one line and exits 143."""
    seen = []

    def write(tmp):
        seen.append(Path(tmp))
        Path(tmp).write_text("half")
        os.kill(os.getpid(), signal.SIGTERM)
        Path(tmp).write_text("never reached")

    def main():
        files.atomic_write(tmp_path / "a.txt", write)
        return 0

    with pytest.raises(SystemExit) as e:
        cli.run(main)
    assert e.value.code == 143
    assert seen and not seen[0].exists() and os.listdir(tmp_path) == []
    err = capsys.readouterr().err
    assert "stopped by SIGTERM" in err and "Traceback" not in err
    assert signal.getsignal(signal.SIGTERM) is not lifecycle._handler    # put back for the test process


def test_a_signal_inside_deferred_waits_for_the_block(tmp_path, capsys):
    """A PNG and its sidecar are renamed into place together: a signal between the two waits."""
    png, tmp_png = tmp_path / "a.png", files.temp_beside(tmp_path / "a.png", lambda p: Path(p).write_text("png"))
    tmp_json = files.temp_beside(tmp_path / "a.json", lambda p: Path(p).write_text("json"))
    real_replace, calls = os.replace, []

    def replace(a, b):
        real_replace(a, b)
        calls.append(b)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGTERM)   # between the PNG's rename and the sidecar's

    def main():
        os.replace = replace
        try:
            files.publish_together([(tmp_png, png), (tmp_json, tmp_path / "a.json")], overwrite=False)
        finally:
            os.replace = real_replace
        return 0

    with pytest.raises(SystemExit) as e:
        cli.run(main)
    assert e.value.code == 143 and len(calls) == 2
    assert sorted(os.listdir(tmp_path)) == ["a.json", "a.png"]


def test_sweep_puts_back_a_folder_set_aside_by_an_unfinished_swap(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()

    def name(target, kind):
        return f".{target}.unidiffuser-{kind}-{lifecycle.HOST}-{dead.pid}-0-0123abcd"

    aside = tmp_path / name("model", "old")            # killed between its two renames: no "model"
    aside.mkdir()
    (aside / "manifest.json").write_text("{}")
    new = tmp_path / name("model", "tmp")
    new.mkdir()
    done_aside = tmp_path / name("other", "old")       # killed after both renames: "other" is the new one
    done_aside.mkdir()
    (tmp_path / "other").mkdir()
    lifecycle.sweep(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["model", "other"]
    assert (tmp_path / "model" / "manifest.json").read_text() == "{}"
