"""The server's batcher in-process, with a stand-in task (no model, no HTTP): what merges, in what
order, up to how many; each job gets exactly its own outputs; a full queue, cancel, timeout,
drain, a failing call. A task is one table entry, so a stand-in is one too."""
import threading
import time

import pytest

pytest.importorskip("fastapi", reason="the server needs fastapi (requirements.txt)")

from unidiffuser.server import batcher   # noqa: E402
from unidiffuser.server.batcher import Batcher, Job, QueueFull   # noqa: E402
from unidiffuser.server.errors import APIError                   # noqa: E402
from unidiffuser.server.tasks import TASKS, BatchKey, Task, require   # noqa: E402


class Gate:
    """A stand-in model: each call records what it got and waits until released."""

    def __init__(self, fail=None):
        self.calls, self.fail = [], fail
        self.release = threading.Event()
        self.entered = threading.Semaphore(0)

    def run(self, pipe, inputs, seeds, key, batch, progress):
        self.calls.append((key, list(inputs), list(seeds), batch))
        self.entered.release()
        assert self.release.wait(10)
        for k in range(1, key.steps + 1):
            progress(0, k)
        if self.fail:
            raise self.fail
        return [f"{x}/{s}" for x, s in zip(inputs, seeds)]


def key(steps=2, size=64, scale=7.0):
    return BatchKey("fake", size, size, steps, scale)


def job(name, n=1, k=None, seed=0, timeout=30.0):
    return Job(name, k or key(), [name] * n, [seed + i for i in range(n)], deadline=time.monotonic() + timeout)


def make(gate, **kw):
    b = Batcher(None, tasks={"fake": Task("fake", ("text",), gate.run)}, **{"max_batch": 4, "wait_s": 0.0,
                                                                       "max_queue": 8, **kw})
    b.start()
    return b


def result(j, timeout=10):
    return j.future.result(timeout)


def test_same_key_merges_up_to_max_batch_oldest_first_each_its_own():
    gate = Gate()
    b = make(gate)
    first = job("first")
    b.submit(first)
    assert gate.entered.acquire(timeout=5)         # running alone; the rest queue behind it
    a, other, c, d, e = job("a", 2, seed=10), job("x", 1, key(steps=3), seed=5), job("c", 1, seed=20), \
        job("d", 2, seed=30), job("e", 1, seed=40)
    for j in (a, other, c, d, e):
        b.submit(j)
    assert b.position(a) == 0 and b.position(e) == 4 and b.position(first) is None
    gate.release.set()
    outs = {j.id: result(j) for j in (first, a, other, c, d, e)}
    assert all(o.error is None for o in outs.values())
    # a(2) + c(1) fit in 4; d(2) would not and waits; e(1) fits: oldest first, skipping what does not fit
    assert [(call[1], call[3]) for call in gate.calls] == [
        (["first"], 1), (["a", "a", "c", "e"], 4), (["x"], 1), (["d", "d"], 2)]
    assert outs["a"].outputs == ["a/10", "a/11"] and outs["c"].outputs == ["c/20"] and outs["e"].outputs == ["e/40"]
    assert outs["d"].outputs == ["d/30", "d/31"] and outs["x"].outputs == ["x/5"]
    assert outs["a"].batch_images == 4 and outs["a"].batch_requests == 3
    assert a.steps_done == a.steps_total == 2 and other.steps_total == 3
    b.stop()


def test_a_job_larger_than_max_batch_runs_alone_in_batches():
    gate = Gate()
    gate.release.set()
    b = make(gate)
    big, small = job("big", 6, seed=100), job("small", 1)
    b.submit(big)
    b.submit(small)
    assert result(big).outputs == [f"big/{100 + i}" for i in range(6)]
    assert result(small).outputs == ["small/0"]
    assert gate.calls[0][1] == ["big"] * 6 and gate.calls[0][3] == 4     # one call, batches of 4
    b.stop()


def test_window_waits_for_company():
    gate = Gate()
    gate.release.set()
    b = make(gate, wait_s=0.3)
    first = job("one")
    b.submit(first)
    time.sleep(0.05)
    second = job("two")
    b.submit(second)
    assert result(first).batch_requests == 2 and result(second).outputs == ["two/0"]
    b.stop()


def test_window_stays_open_while_requests_keep_arriving():
    """Arrivals closer together than wait_s keep the window open (a burst spread over more than
    wait_s shares one batch), but never beyond WINDOW_CAP * wait_s after the oldest."""
    gate = Gate()
    gate.release.set()
    b = make(gate, wait_s=0.6)
    burst = []
    for i in range(3):                    # 0.8 s in all (more than wait_s), each within 0.6 s of the one before
        burst.append(job(f"b{i}"))
        b.submit(burst[-1])
        time.sleep(0.4 if i < 2 else 0)
    assert [result(j).batch_requests for j in burst] == [3, 3, 3]
    assert len(gate.calls) == 1
    b.stop()
    b = make(gate, wait_s=0.6, max_batch=16, max_queue=16)
    trickle = []
    t0 = time.monotonic()
    for i in range(14):                   # one every 0.3 s, for longer than the cap
        trickle.append(job(f"t{i}"))
        b.submit(trickle[-1])
        time.sleep(0.3)
    first_call = result(trickle[0])
    assert first_call.batch_requests < len(trickle)
    assert first_call.queue_s <= batcher.WINDOW_CAP * 0.6 + 0.5, first_call.queue_s
    assert time.monotonic() - t0 < 15
    b.stop()


def test_full_queue_cancel_timeout_and_drain():
    gate = Gate()
    b = make(gate, max_queue=3)
    running = job("running")
    b.submit(running)
    assert gate.entered.acquire(timeout=5)
    q = [job(f"q{i}", k=key(size=32 * (i + 1))) for i in range(3)]      # three keys, so none merge
    for j in q:
        b.submit(j)
    with pytest.raises(QueueFull) as e:
        b.submit(job("one too many"))
    assert e.value.retry_after >= 1
    assert b.cancel(q[0]) and result(q[0]).error.status == 499 and q[0].state == "dropped"    # costs nothing
    assert not b.cancel(running)                                     # started: runs to the end
    late = job("late", k=key(size=512), timeout=0.05)
    b.submit(late)
    time.sleep(0.1)
    dropped = b.drain()
    assert set(dropped) <= {q[1], q[2], late}
    for j in (q[1], q[2]):
        assert result(j).error.status == 503 and result(j).error.code == "draining"
    with pytest.raises(APIError) as e:
        b.submit(job("after"))
    assert e.value.status == 503
    gate.release.set()
    assert result(running).outputs == ["running/0"]
    assert result(late).error.status == 503
    assert b.wait_idle(5)
    assert [c[1] for c in gate.calls] == [["running"]]               # nothing else ever ran
    b.stop()


def test_a_failing_call_answers_its_jobs_and_the_worker_goes_on():
    gate = Gate(fail=RuntimeError("out of memory"))
    gate.release.set()
    b = make(gate)
    bad = job("bad")
    b.submit(bad)
    err = result(bad).error
    assert err.status == 500 and "out of memory" in err.message and err.code == "model_error"
    gate.fail = None
    ok = job("ok")
    b.submit(ok)
    assert result(ok).outputs == ["ok/0"]
    b.stop()


def test_tasks_table():
    from unidiffuser import tasks as library
    assert set(TASKS) == set(library.TASKS)
    for name, t in TASKS.items():
        assert (t.name, t.outputs, t.input) == (name, library.TASKS[name].outputs, library.TASKS[name].input)
    assert TASKS["joint"].outputs == ("image", "text") and TASKS["i2t2i"].solver_runs == 2
    assert not TASKS["i"].guided and not TASKS["t"].guided and TASKS["t2i"].guided and TASKS["joint"].guided
    assert require("t2i") is TASKS["t2i"]
    only_t2i = {"t2i": TASKS["t2i"]}
    with pytest.raises(APIError) as e:
        require("i2t2i", only_t2i)
    assert e.value.status == 404 and "task i2t2i (image variation) is not available on this server" in e.value.message
    with pytest.raises(APIError) as e:
        require("joint", only_t2i, "task", status=400)
    assert e.value.status == 400 and e.value.param == "task" and e.value.code == "task_not_available"
    with pytest.raises(APIError) as e:
        require("nonsense", None, "task")
    assert e.value.status == 400 and e.value.code == "invalid_value"


def test_missing_networks_from_the_manifest():
    from unidiffuser.server.tasks import missing_networks
    full = {"files": {f: {} for f in ("text_encoder.safetensors", "uvit.safetensors", "vae_decoder.safetensors",
                                      "vae_encoder.safetensors", "image_encoder.safetensors",
                                      "caption_decoder.safetensors")}}
    assert all(missing_networks(full, t) == [] for t in TASKS)
    old = {"files": {f: {} for f in ("text_encoder.safetensors", "uvit.safetensors", "vae_decoder.safetensors")}}
    assert missing_networks(old, "t2i") == [] and missing_networks(old, "i") == []
    assert missing_networks(old, "i2t") == ["vae_encoder.safetensors", "image_encoder.safetensors",
                                            "caption_decoder.safetensors"]


def test_progress_counts_every_solver_run():
    """A task of two solver runs (i2t2i, t2i2t) reports 2 x steps per batch."""
    seen = []

    def run(pipe, inputs, seeds, key, batch, progress):
        for b in range(-(-len(inputs) // batch)):
            for k in range(1, 2 * key.steps + 1):
                progress(b, k)
                seen.append((j.steps_done, j.steps_total))
        return list(inputs)

    b = Batcher(None, tasks={"fake": Task("fake", ("image",), run, "image", solver_runs=2)}, max_batch=2, wait_s=0.0)
    b.start()
    j = job("two-runs", n=3, k=key(steps=3))
    b.submit(j)
    assert result(j).outputs == ["two-runs"] * 3
    assert seen[0] == (1, 12) and seen[5] == (6, 12) and seen[-1] == (12, 12)     # 2 calls x 2 runs x 3 steps
    b.stop()
