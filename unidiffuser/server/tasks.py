"""What the server can run, as data: a task is one entry of TASKS.

A batch is keyed by (task, height, width, steps, scale): requests with the same key can share one
model call, each with its own inputs and seeds. The batcher knows nothing about any task; it
looks the key's task up here and calls its `run` with the merged inputs (prompts, checked input
images, or None per sample), and gets one Sample per input back. Which routes take which task's
request is app.py's business (its checks: parsing.py, uploads.py); what a task reads and makes is
the library's (unidiffuser.tasks).

A task the model folder cannot run (a folder converted before the image and caption networks)
is left out when the server starts (`available`); its endpoint then answers "task X is not
available on this server" (404 for an endpoint of its own, 400 for a `task` field that names it).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Sequence

from .. import tasks as library
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


class Sample(NamedTuple):
    """One sample's outputs: a PIL image and/or a text (joint has both)."""
    image: Any = None
    text: str | None = None


@dataclass(frozen=True)
class Task:
    name: str
    outputs: tuple[str, ...]    # "image" and/or "text": how a route encodes the results
    # run(pipe, inputs, seeds, key, batch, progress) -> one output per input, in order. inputs and
    # seeds are the merged requests' (one per output); batch: outputs per model call.
    run: Callable[[Any, Sequence[Any], Sequence[int], BatchKey, int, Progress], list]
    input: str | None = None    # "prompt", "image" or None: what a request gives per sample
    solver_runs: int = 1        # model evaluations per batch are solver_runs x steps (progress)
    guided: bool = True         # False: the guidance scale changes nothing (the key fixes it)


def _runner(name: str):
    kind = library.TASKS[name].input

    def run(pipe, inputs, seeds, key: BatchKey, batch: int, progress: Progress) -> list:
        # Sample i has its own input and seed: the same as run.py --task NAME --seed seeds[i] alone.
        out = pipe.generate(name, None if kind is None else list(inputs), n=1 if kind else len(seeds),
                            seeds=list(seeds), batch=batch, steps=key.steps, scale=key.scale,
                            height=key.height, width=key.width, progress=progress)
        images = list(out.images) or [None] * len(seeds)
        texts = list(out.texts) or [None] * len(seeds)
        return [Sample(img, text) for img, text in zip(images, texts)]
    return run


def _task(name: str) -> Task:
    t = library.TASKS[name]
    guided = any(library.MODES[m].uncond for m in t.modes)
    return Task(name, t.outputs, _runner(name), t.input, len(t.modes), guided)


# Every task of the library; `available` keeps those a model folder can run.
TASKS: dict[str, Task] = {name: _task(name) for name in library.TASKS}


def missing_networks(manifest: dict, name: str) -> list[str]:
    """The network files a model folder (its manifest) lacks for this task."""
    from ..networks import NETWORKS
    files = manifest.get("files", {})
    return [NETWORKS[n].file for n in library.TASKS[name].networks if n in NETWORKS and NETWORKS[n].file not in files]


def require(name: str, available: dict[str, Task] | None = None, param: str | None = None, status: int = 404) -> Task:
    """The task, or the error that says it is not on this server (or not a task at all)."""
    available = TASKS if available is None else available
    if name in available:
        return available[name]
    here = ", ".join(sorted(available))
    if name in KNOWN:
        raise APIError(status, f"task {name} ({KNOWN[name]}) is not available on this server (it runs: {here}; "
                       "a model folder converted before the image and caption networks runs t2i and i only, and "
                       "serve.py --tasks may leave tasks out)", param, "task_not_available")
    raise APIError(400, f"task must be one of {', '.join(KNOWN)}, got {name!r}", param, "invalid_value")
