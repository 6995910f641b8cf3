"""Prometheus text exposition (format 0.0.4), written by hand: counters, gauges, histograms.

Thread-safe: the model's worker thread and the event loop both record."""
from __future__ import annotations

import math
import threading
from typing import Callable, Iterable, Sequence


def _labels(names: Sequence[str], values: Sequence[str], extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _escape(v) -> str:
    return str(v).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _num(x: float) -> str:
    if math.isinf(x):
        return "+Inf" if x > 0 else "-Inf"
    return repr(float(x)) if not float(x).is_integer() else str(int(x))


class _Metric:
    kind = ""

    def __init__(self, registry: "Registry", name: str, help: str, labels: Sequence[str] = ()):
        self.name, self.help, self.labelnames = name, help, tuple(labels)
        self._lock = registry.lock
        registry.metrics.append(self)

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]


class Counter(_Metric):
    kind = "counter"

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self._values: dict[tuple, float] = {}

    def inc(self, *labels: str, by: float = 1.0) -> None:
        with self._lock:
            self._values[labels] = self._values.get(labels, 0.0) + by

    def value(self, *labels: str) -> float:
        with self._lock:
            return self._values.get(labels, 0.0)

    def render(self) -> list[str]:
        lines = self.header()
        if not self.labelnames and not self._values:
            lines.append(f"{self.name} 0")
        for labels, v in sorted(self._values.items()):
            lines.append(f"{self.name}{_labels(self.labelnames, labels)} {_num(v)}")
        return lines


class Gauge(_Metric):
    """A value read when scraped (fn), or set."""
    kind = "gauge"

    def __init__(self, *a, fn: Callable[[], float] | None = None, **k):
        super().__init__(*a, **k)
        self.fn, self._value = fn, 0.0

    def set(self, v: float) -> None:
        self._value = v

    def render(self) -> list[str]:
        return self.header() + [f"{self.name} {_num(self.fn() if self.fn else self._value)}"]


class Histogram(_Metric):
    kind = "histogram"

    def __init__(self, *a, buckets: Iterable[float], **k):
        super().__init__(*a, **k)
        self.buckets = sorted(buckets) + [math.inf]
        self._counts: dict[tuple, list[int]] = {}
        self._sums: dict[tuple, float] = {}

    def observe(self, x: float, *labels: str) -> None:
        with self._lock:
            counts = self._counts.setdefault(labels, [0] * len(self.buckets))
            for i, b in enumerate(self.buckets):
                if x <= b:
                    counts[i] += 1
            self._sums[labels] = self._sums.get(labels, 0.0) + x

    def count(self, *labels: str) -> int:
        with self._lock:
            return self._counts.get(labels, [0] * len(self.buckets))[-1]

    def render(self) -> list[str]:
        lines = self.header()
        series = sorted(self._counts.items()) or ([((), [0] * len(self.buckets))] if not self.labelnames else [])
        for labels, counts in series:
            for b, c in zip(self.buckets, counts):
                le = 'le="' + _num(b) + '"'
                lines.append(f"{self.name}_bucket{_labels(self.labelnames, labels, le)} {c}")
            lab = _labels(self.labelnames, labels)
            lines.append(f"{self.name}_sum{lab} {_num(self._sums.get(labels, 0.0))}")
            lines.append(f"{self.name}_count{lab} {counts[-1]}")
        return lines


class Registry:
    def __init__(self):
        self.lock = threading.RLock()
        self.metrics: list[_Metric] = []

    def render(self) -> str:
        with self.lock:
            return "\n".join(line for m in self.metrics for line in m.render()) + "\n"


class ServerMetrics:
    """The server's metrics (names documented in docs/server.md)."""

    def __init__(self, queue_depth: Callable[[], float], running: Callable[[], float]):
        r = self.registry = Registry()
        self.requests = Counter(r, "unidiffuser_http_requests_total", "HTTP requests answered, by endpoint and status",
                                ("endpoint", "status"))
        Gauge(r, "unidiffuser_queue_depth", "requests waiting for a batch (not counting the running one)", fn=queue_depth)
        Gauge(r, "unidiffuser_running_images", "images in the model call running now", fn=running)
        self.batch_size = Histogram(r, "unidiffuser_batch_images", "images per model call (merged requests)",
                                    buckets=(1, 2, 4, 8, 16, 32, 64))
        self.batch_requests = Histogram(r, "unidiffuser_batch_requests", "requests merged into one model call",
                                        buckets=(1, 2, 4, 8, 16, 32, 64))
        self.latency = Histogram(r, "unidiffuser_request_latency_seconds",
                                 "time from a request's arrival to its answer", ("task",),
                                 buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128, 300))
        self.queue_wait = Histogram(r, "unidiffuser_queue_wait_seconds", "time a request waited before its batch started",
                                    buckets=(0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 300))
        self.images = Counter(r, "unidiffuser_images_generated_total", "images generated (and answered)", ("task",))
        self.texts = Counter(r, "unidiffuser_texts_generated_total", "texts generated (and answered)", ("task",))
        self.dropped = Counter(r, "unidiffuser_requests_dropped_total",
                               "accepted requests that never ran: client gone, timed out in the queue, draining",
                               ("reason",))
        self.failed_batches = Counter(r, "unidiffuser_failed_batches_total", "model calls that raised")

    def render(self) -> str:
        return self.registry.render()
