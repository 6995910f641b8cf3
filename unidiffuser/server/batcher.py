"""Dynamic batching: one model call at a time, in a worker thread, over merged requests.

A request (a Job) waits in a bounded FIFO queue. The worker takes the oldest job and, once no job
of its key has arrived for `wait_s` (each arrival restarts the wait, up to WINDOW_CAP times
`wait_s` after the oldest arrived) or enough images of its key are waiting to fill `max_batch`,
runs it together with every other waiting job of the same key (task, height, width, steps,
scale), oldest first, up to `max_batch` images. A lone request so waits `wait_s`; clients that
come back together after a batch (each parsing its answer first, so spread over more than
`wait_s`) still share the next one. Each job keeps its own inputs and seeds and gets exactly its own
outputs back: the merged call is `task.run(pipe, inputs, seeds, key, batch, progress)` over the
concatenation, cut back into the jobs' slices. A job larger than `max_batch` runs alone, in
several batches of `max_batch` inside one call.

Thread model: `submit`, `cancel` and `position` are called from the event loop, the worker runs
the model; both sides meet under one condition variable. A job's outcome is a
concurrent.futures.Future (await it with asyncio.wrap_future); it always gets a result, never an
exception: an Outcome with outputs or with the APIError to answer.
"""
from __future__ import annotations

import concurrent.futures
import itertools
import logging
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from .errors import APIError
from .tasks import TASKS, BatchKey, Task

log = logging.getLogger("unidiffuser.server")
WINDOW_CAP = 5      # the longest a batch's window stays open, in units of wait_s after its oldest job


@dataclass
class Outcome:
    outputs: list | None = None
    error: APIError | None = None
    batch_images: int = 0          # images in the model call this job ran in (merged)
    batch_requests: int = 0
    queue_s: float = 0.0           # submit -> its call started
    run_s: float = 0.0             # the call's duration


@dataclass(eq=False)
class Job:
    id: str
    key: BatchKey
    inputs: list                   # one per output: prompts, checked input images, or None
    seeds: list[int]
    deadline: float                # time.monotonic() after which a queued job is answered 503
    submitted: float = field(default_factory=time.monotonic)
    state: str = "new"             # new -> queued -> running -> done | dropped
    steps_done: int = 0            # model evaluations done in its call, across the call's batches
    steps_total: int = 0
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)

    @property
    def n(self) -> int:
        return len(self.inputs)


class QueueFull(Exception):
    def __init__(self, retry_after: int):
        super().__init__(f"retry after {retry_after} s")
        self.retry_after = retry_after


class Batcher:
    def __init__(self, pipe, max_batch: int = 8, wait_s: float = 0.01, max_queue: int = 64,
                 tasks: dict[str, Task] | None = None, on_batch: Callable[[list[Job], list[Outcome]], None] | None = None):
        self.pipe, self.max_batch, self.wait_s, self.max_queue = pipe, max_batch, wait_s, max_queue
        self.tasks = TASKS if tasks is None else tasks
        self.on_batch = on_batch            # metrics hook, called in the worker after each call
        self._cond = threading.Condition()
        self._pending: deque[Job] = deque()
        self._running: list[Job] = []
        self._draining = False
        self._stopped = False
        self._batch_s = 0.0                 # running mean of a call's duration (for Retry-After)
        self._thread: threading.Thread | None = None

    # ---- the event loop's side ---------------------------------------------------------------
    def start(self) -> None:
        """Run the model's loop in a thread of its own (see `work` to run it in the caller's)."""
        self._thread = threading.Thread(target=self.work, name="unidiffuser-batcher", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        """Queue a job, or raise: QueueFull (429) or APIError 503 while draining."""
        with self._cond:
            if self._draining:
                raise APIError(503, "the server is shutting down and accepts no new requests", code="draining")
            if len(self._pending) >= self.max_queue:
                raise QueueFull(self._retry_after_locked())
            job.state = "queued"
            self._pending.append(job)
            self._cond.notify_all()

    def cancel(self, job: Job, error: APIError | None = None) -> bool:
        """Take a job that has not started out of the queue (it then costs nothing); True if it
        was taken. Its future gets `error` (or a plain 'dropped' outcome)."""
        with self._cond:
            if job.state != "queued":
                return False
            self._pending.remove(job)
            job.state = "dropped"
            self._cond.notify_all()
        job.future.set_result(Outcome(error=error or APIError(499, "the client went away")))
        return True

    def position(self, job: Job) -> int | None:
        """Jobs ahead of this one in the queue (0: next), None once it has left the queue."""
        with self._cond:
            if job.state != "queued":
                return None
            for i, j in enumerate(self._pending):
                if j is job:
                    return i
            return None

    @property
    def queue_depth(self) -> int:
        return len(self._pending)

    @property
    def running_images(self) -> int:
        return sum(j.n for j in self._running)

    def drain(self) -> list[Job]:
        """Stop accepting; answer every queued job 503; the running call finishes. Returns the
        jobs that were dropped."""
        with self._cond:
            self._draining = True
            dropped = list(self._pending)
            self._pending.clear()
            for j in dropped:
                j.state = "dropped"
            self._cond.notify_all()
        for j in dropped:
            j.future.set_result(Outcome(error=APIError(503, "the server is shutting down; this request "
                                                            "did not start (retry elsewhere)", code="draining")))
        return dropped

    def idle(self) -> bool:
        with self._cond:
            return not self._pending and not self._running

    def wait_idle(self, timeout: float | None = None) -> bool:
        end = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._pending or self._running:
                left = None if end is None else end - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(left if left is not None else 0.5)
            return True

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()

    def _retry_after_locked(self) -> int:
        """Seconds until the queue has room, roughly: the calls needed for what waits ahead."""
        waiting = sum(j.n for j in self._pending)
        calls = max(1, math.ceil(waiting / self.max_batch))
        return max(1, math.ceil(calls * (self._batch_s or 1.0)))

    # ---- the worker's side -------------------------------------------------------------------
    def work(self) -> None:
        """The model's loop: take a batch, run it, answer; until stop(). Every model call of the
        server runs in the thread that runs this (the one that loaded and warmed the model)."""
        while True:
            jobs = self._next_batch()
            if jobs is None:
                return
            self._run(jobs)

    def _expire_locked(self, now: float) -> list[Job]:
        late = [j for j in self._pending if j.deadline <= now]
        for j in late:
            self._pending.remove(j)
            j.state = "dropped"
        return late

    def _next_batch(self) -> list[Job] | None:
        late: list[Job] = []
        try:
            with self._cond:
                while True:
                    now = time.monotonic()
                    late += self._expire_locked(now)
                    if self._stopped:
                        return None
                    if not self._pending:
                        self._cond.notify_all()      # wake wait_idle()
                        self._cond.wait(0.5)
                        continue
                    first = self._pending[0]
                    same = [j for j in self._pending if j.key == first.key]
                    due = min(first.submitted + WINDOW_CAP * self.wait_s, same[-1].submitted + self.wait_s)
                    if now < due and sum(j.n for j in same) < self.max_batch and not self._draining:
                        self._cond.wait(min(due - now, max(0.0, min(j.deadline for j in self._pending) - now)))
                        continue
                    take, images = [], 0
                    for j in same:           # oldest first; a job that does not fit waits for the next call
                        if take and images + j.n > self.max_batch:
                            continue
                        take.append(j)
                        images += j.n
                    for j in take:
                        self._pending.remove(j)
                        j.state = "running"
                    self._running = take
                    return take
        finally:
            for j in late:
                j.future.set_result(Outcome(error=APIError(
                    503, "timed out waiting in the queue (--request-timeout-s); try again later", code="timeout")))

    def _run(self, jobs: list[Job]) -> None:
        key = jobs[0].key
        task = self.tasks[key.task]
        inputs = [x for j in jobs for x in j.inputs]
        seeds = [s for j in jobs for s in j.seeds]
        batch = min(len(inputs), self.max_batch)
        calls = math.ceil(len(inputs) / batch)
        per_batch = key.steps * task.solver_runs        # i2t2i, t2i2t: two solver runs per batch
        for j in jobs:
            j.steps_total, j.steps_done = calls * per_batch, 0

        def progress(b: int, k: int) -> None:
            done = min(b * per_batch + k, calls * per_batch)
            for j in jobs:
                j.steps_done = done

        t0 = time.monotonic()
        try:
            outputs = task.run(self.pipe, inputs, seeds, key, batch, progress)
            if len(outputs) != len(inputs):
                raise RuntimeError(f"task {key.task} returned {len(outputs)} outputs for {len(inputs)} inputs")
            error = None
        except ValueError as e:          # an input the API refused that our checks let through
            outputs, error = None, APIError(400, str(e))
        except Exception as e:           # the model failed (out of memory, ...): answer, stay up
            log.exception("the model call failed (task %s, %d image(s))", key.task, len(inputs))
            outputs, error = None, APIError(500, f"the model failed on this batch: {type(e).__name__}: {e}",
                                            code="model_error")
        run_s = time.monotonic() - t0
        self._batch_s = run_s if not self._batch_s else 0.8 * self._batch_s + 0.2 * run_s
        offsets = list(itertools.accumulate([0] + [j.n for j in jobs]))
        outcomes = []
        for j, a, b in zip(jobs, offsets, offsets[1:]):
            j.steps_done = j.steps_total
            outcomes.append(Outcome(outputs=None if outputs is None else outputs[a:b], error=error,
                                    batch_images=len(inputs), batch_requests=len(jobs),
                                    queue_s=t0 - j.submitted, run_s=run_s))
        with self._cond:
            for j in jobs:
                j.state = "done"
            self._running = []
            self._cond.notify_all()
        if self.on_batch is not None:
            try:
                self.on_batch(jobs, outcomes)
            except Exception:
                log.exception("metrics hook failed")
        for j, o in zip(jobs, outcomes):
            j.future.set_result(o)
