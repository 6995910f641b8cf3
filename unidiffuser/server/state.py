"""The server's settings (ServerConfig) and what its parts share (ServerState). main fills them
in; the routes, the request checks and the gate read them, so they live apart from all three."""
from __future__ import annotations

import time
from dataclasses import dataclass

from .. import limits
from . import tasks
from .batcher import Batcher, Job
from .errors import APIError
from .metrics import ServerMetrics

MAX_UPLOAD = 16 << 20             # bytes of a multipart body (one image file and a few fields)


@dataclass
class ServerConfig:
    model_id: str = "unidiffuser"
    api_key: str | None = None
    max_batch: int = 8
    batch_wait_ms: float = 10.0
    max_queue: int = 64
    request_timeout_s: float = 300.0
    max_side: int = limits.MAX_SIDE
    max_upload: int = MAX_UPLOAD      # bytes of a multipart body (--max-upload-mib)


class ServerState:
    """What the routes share: the status, the pipeline's batcher once loaded, metrics, jobs."""

    def __init__(self, config: ServerConfig):
        self.config = config
        self.status, self.reason = "loading", "loading the model"
        self.failure: str | None = None
        self.stop = lambda: None          # set by main: stops the HTTP server
        self.batcher: Batcher | None = None
        self.tasks: dict[str, tasks.Task] = {}     # what this server runs, once ready
        self.default_size = 512
        self.model_info: dict = {}
        self.jobs: dict[str, Job] = {}
        self.created = int(time.time())
        self.metrics = ServerMetrics(lambda: self.batcher.queue_depth if self.batcher else 0,
                                     lambda: self.batcher.running_images if self.batcher else 0)

    def ready(self, pipe, model_info: dict, served: dict[str, tasks.Task] | None = None) -> Batcher:
        """The model is loaded and warm: requests are accepted from now on, for the `served` tasks
        (default: every task). The caller runs the returned batcher's loop (`work()`), in the
        thread that loaded the model."""
        self.default_size = pipe.default_size
        self.model_info = model_info
        self.tasks = dict(tasks.TASKS if served is None else served)
        self.batcher = Batcher(pipe, self.config.max_batch, self.config.batch_wait_ms / 1000, self.config.max_queue,
                               tasks=self.tasks, on_batch=self._on_batch)
        self.status, self.reason = "ok", ""
        return self.batcher

    def fail(self, message: str) -> None:
        """Loading failed: the command says `message` in one line and exits 2."""
        self.failure, self.status, self.reason = message, "failed", message
        self.stop()

    def _on_batch(self, jobs: list[Job], outcomes: list) -> None:
        self.metrics.batch_size.observe(outcomes[0].batch_images)
        self.metrics.batch_requests.observe(outcomes[0].batch_requests)
        if outcomes[0].error is not None:
            self.metrics.failed_batches.inc()
        for o in outcomes:
            self.metrics.queue_wait.observe(o.queue_s)

    DRAINING = "shutting down (SIGTERM): finishing the running batch, accepting nothing new"

    def begin_drain(self) -> None:
        self.status, self.reason = "draining", self.DRAINING
        if self.batcher is not None:
            for _ in self.batcher.drain():
                self.metrics.dropped.inc("draining")

    def task(self, name: str, param: str | None = None, status: int = 404) -> tasks.Task:
        """A task this server runs, or the error that says it does not (tasks.require)."""
        return tasks.require(name, self.tasks, param, status)

    def require_ready(self) -> Batcher:
        if self.status != "ok" or self.batcher is None:
            raise APIError(503, f"the server is not ready: {self.status} ({self.reason})", code=self.status,
                           headers={"Retry-After": "5"} if self.status in ("loading", "warming") else None)
        return self.batcher
