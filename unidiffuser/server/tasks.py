"""What the server can run, as data: a task is one entry of TASKS.

A batch is keyed by (task, height, width, steps, scale): requests with the same key can share one
model call, each with its own inputs and seeds. The batcher knows nothing about any task; it
looks the key's task up here and calls its `run` with the merged inputs. Adding a task (image
captioning, image variation, joint or unconditional generation) is one entry below plus the
route that parses its request; until then its endpoint answers "task X is not available in this
build" (404 for an endpoint of its own, 400 for a `task` field that names it).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

from .errors import APIError

# UniDiffuser's modes (the original's sample_multi_v1.py names them so) and what they are.
KNOWN = {
    "t2i": "text to image",
    "i2t": "image to text, captioning",
    "i2t2i": "image variation",
    "t2i2t": "text variation",
    "joint": "joint image and text",
    "i": "unconditional image",
    "t": "unconditional text",
}


@dataclass(frozen=True)
class BatchKey:
    """What requests must share to run in one model call."""
    task: str
    height: int
    width: int
    steps: int
    scale: float


Progress = Callable[[int, int], None]   # (batch index within the call, model evaluations done in it)


@dataclass(frozen=True)
class Task:
    name: str
    output: str     # "image" (PIL images) or "text" (strings): how a route encodes the results
    # run(pipe, inputs, seeds, key, batch, progress) -> one output per input, in order. inputs and
    # seeds are the merged requests' (one per output); batch: outputs per model call.
    run: Callable[[Any, Sequence[Any], Sequence[int], BatchKey, int, Progress], list]


def _run_t2i(pipe, prompts, seeds, key: BatchKey, batch: int, progress: Progress) -> list:
    out = pipe(list(prompts), seeds=list(seeds), batch=batch, steps=key.steps, scale=key.scale,
               height=key.height, width=key.width, progress=progress)
    return list(out.images)


# The tasks this build runs.
TASKS: dict[str, Task] = {
    "t2i": Task("t2i", "image", _run_t2i),
}


def require(name: str, param: str | None = None, status: int = 404) -> Task:
    """The task, or the error that says it is not in this build (or not a task at all)."""
    if name in TASKS:
        return TASKS[name]
    here = ", ".join(sorted(TASKS))
    if name in KNOWN:
        raise APIError(status, f"task {name} ({KNOWN[name]}) is not available in this build "
                       f"(this server runs: {here})", param, "task_not_available")
    raise APIError(400, f"task must be one of {here}, got {name!r}", param, "invalid_value")
