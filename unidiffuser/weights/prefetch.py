"""The network files, mapped and hashed in background threads from a command's first second.

Hashing 2 GB is the longest part of loading v1 and needs no torch, so run.py starts it here, once
its arguments are checked, and torch's import (seconds) runs beside it. The loader
(checkpoints.py) takes each file's mapping and digest from here, or starts them itself the same way. The threads are
daemons: a command that stops on a later error exits at once, not after the hashing."""
from __future__ import annotations

import hashlib
import mmap
import os
import sys
import threading
from concurrent.futures import Future
from pathlib import Path
from typing import Iterable

_started: dict[Path, tuple[mmap.mmap, Future]] = {}


def map_file(path: Path) -> mmap.mmap:
    """The whole file as a private copy-on-write mapping: the page cache is mapped, not copied,
    and the tensors made from it are writable views (nothing writes them)."""
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            raise ValueError(f"{path}: empty file")
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)


def populate(mem: mmap.mmap) -> None:
    """Map the cached pages in one call, not one fault each (Linux >= 5.14)."""
    if sys.platform == "linux":
        try:
            mem.madvise(getattr(mmap, "MADV_POPULATE_READ", 22))
        except OSError:
            pass


def sha256_in_thread(mem: mmap.mmap) -> Future:
    """hashlib releases the GIL on large buffers, so the digest is computed beside other work."""
    done: Future = Future()

    def work():
        try:
            populate(mem)
            done.set_result(hashlib.sha256(mem).hexdigest())
        except BaseException as e:   # reported by whoever waits for it
            done.set_exception(e)

    threading.Thread(target=work, name="sha256", daemon=True).start()
    return done


def start(paths: Iterable[Path]) -> None:
    """Map each file and start hashing it, largest first. A file that cannot be mapped is skipped:
    the loader maps it again and reports the problem."""
    files = []
    for p in map(Path, paths):
        try:
            files.append((p.stat().st_size, p))
        except OSError:
            continue
    for _, p in sorted(files, reverse=True):
        try:
            mem = map_file(p)
        except (OSError, ValueError):
            continue
        _started[p.resolve()] = (mem, sha256_in_thread(mem))


def take(path: Path) -> tuple[mmap.mmap, Future] | None:
    """The mapping and digest started for path, once (None when it was not started)."""
    return _started.pop(Path(path).resolve(), None)
