"""Writing files so that a crash or a full disk never leaves a half-written one behind, and
publishing several files (an image and its sidecar) so that they always come from one run."""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

from . import lifecycle


def sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


class WriteError(OSError):
    """A file that could not be written (disk full, read-only, ...). Nothing half-written stays."""


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_failure(path: Path, e: BaseException) -> WriteError:
    """One clear line for a failed write. torch.save and safetensors report a full disk as
    RuntimeError / SafetensorError without errno, so the free space is asked too."""
    code = getattr(e, "errno", None)
    try:
        free = shutil.disk_usage(Path(path).parent).free
    except OSError:
        free = None
    if code == errno.ENOSPC or (free is not None and free < 64 << 20) or "No space left" in str(e):
        why = "the disk is full" + (f" ({free / 2**20:.0f} MiB free)" if free is not None else "")
    else:
        why = getattr(e, "strerror", None) or f"{type(e).__name__}: {e}"
    return WriteError(code or errno.EIO, f"{path}: could not write it ({why}); nothing half-written was left")


def is_write_error(e: BaseException) -> bool:
    # torch.save raises RuntimeError("[enforce fail at inline_container.cc...] file write failed"),
    # safetensors its own SafetensorError; both mean the bytes did not reach the disk.
    return isinstance(e, (OSError, RuntimeError)) or type(e).__name__ == "SafetensorError"


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """write(tmp_path) fills a temporary file beside `path`, which then replaces `path` at once."""
    tmp = temp_beside(path, write)
    try:
        os.replace(tmp, path)
    except OSError as e:
        lifecycle.remove(tmp)
        raise write_failure(Path(path), e) from e
    lifecycle.disown(tmp)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


@contextmanager
def folder_lock(folder: Path):
    """An exclusive lock on a folder (flock on its descriptor: no lock file is left behind),
    so that concurrent runs publish their files one run at a time."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)   # closing releases the lock


def publish_together(pairs: list[tuple[Path, Path]], overwrite: bool) -> None:
    """Rename each finished temporary file onto its target, all under one folder lock, so that
    files published together (a PNG and its sidecar) always come from the same run. Without
    `overwrite` an existing target is never replaced: FileExistsError names it, and the
    temporary files are removed."""
    targets = [t for _, t in pairs]
    try:
        with folder_lock(targets[0].parent):
            if not overwrite:
                taken = [t for t in targets if t.exists()]
                if taken:
                    raise FileExistsError(errno.EEXIST, f"{taken[0]}: exists (written meanwhile by another run?); "
                                          "not replaced without --overwrite")
            with lifecycle.deferred():    # SIGTERM here: after the last rename, never between two
                for tmp, target in pairs:
                    os.replace(tmp, target)
                    lifecycle.disown(tmp)
    finally:
        for tmp, _ in pairs:
            lifecycle.remove(tmp)


def temp_beside(path: Path, write: Callable[[str], None]) -> Path:
    """write(tmp) fills a hidden temporary file beside `path` (its name carries this process's
    mark, lifecycle.marked); returns it (for publish_together). Until it is renamed into place it
    is owned: a stopped run removes it on the way out, a killed one is swept by the next run."""
    path = Path(path)
    lifecycle.sweep_once(path.parent)
    tmp = path.parent / lifecycle.marked(path.name, path.suffix)
    lifecycle.own(tmp)
    try:
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        write(str(tmp))
        os.chmod(tmp, 0o666 & ~current_umask())   # created 0600 (as mkstemp); give the file the usual mode
    except BaseException as e:
        lifecycle.remove(tmp)
        if isinstance(e, Exception) and is_write_error(e) and not isinstance(e, WriteError):
            raise write_failure(path, e) from e
        raise
    return tmp


def temp_dir_beside(path: Path) -> Path:
    """A hidden, marked, owned temporary folder beside `path`, for a folder written complete
    before it is renamed into place (lifecycle.remove it, or rename it and lifecycle.disown it)."""
    path = Path(path)
    lifecycle.sweep_once(path.parent)
    return _owned_dir(path.parent / lifecycle.marked(path.name), 0o777)


def temp_dir(name: str) -> Path:
    """A private, marked, owned folder in the temporary directory (cli.run sweeps it there)."""
    return _owned_dir(lifecycle.temp_root() / lifecycle.marked(name), 0o700)


def _owned_dir(tmp: Path, mode: int) -> Path:
    lifecycle.own(tmp, folder=True)
    try:
        os.mkdir(tmp, mode)    # less the umask, as any new folder
    except BaseException:
        lifecycle.remove(tmp)  # made, when a signal came just after
        raise
    return tmp


def slug(text: str, n: int = 48) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:n].rstrip("-")


def image_name(prompt: str, seed: int) -> str:
    """What a text-to-image result is called, in run.py's output and the API's save(): PROMPT-SLUG_seedN.png."""
    return f"{output_stem('t2i', prompt, seed)}.png"


def output_stem(task: str, source, seed: int) -> str:
    """The name of a sample's files (without suffix), from its input and seed: a prompt's slug, an
    image file's stem, or the task; other tasks than t2i say which: PROMPT-SLUG_seedN (t2i),
    PHOTO_i2t_seedN, joint_seedN."""
    if isinstance(source, str):
        name = slug(source) or "prompt"
    elif isinstance(source, dict):          # an input image's record (images.InputImage.describe)
        name = slug(Path(source["name"]).stem) or "image"
    else:
        name = ""
    return "_".join(filter(None, [name, None if task == "t2i" else task, f"seed{seed}"]))


def write_outputs(items: list[tuple[Path, list[tuple[Path, Callable[[str], None]]], dict]], overwrite: bool) -> None:
    """Each (sidecar path, [(path, writer), ...], sidecar): a sample's files and its JSON sidecar
    (strict JSON, with each file's sha256 as "<suffix>_sha256"), all written under temporary names
    first and then renamed together under a lock on the folder: one call's files all come from one
    run, are all published or none are (an existing name without overwrite refuses the whole call),
    even with concurrent runs."""
    pairs: list[tuple[Path, Path]] = []
    try:
        for json_path, files, sidecar in items:
            hashes = {}
            for path, write in files:
                tmp = temp_beside(path, write)
                pairs.append((tmp, path))
                hashes[f"{path.suffix[1:]}_sha256"] = sha256(tmp)
            text = json.dumps({**sidecar, **hashes}, indent=2, allow_nan=False) + "\n"
            pairs.append((temp_beside(json_path, lambda p: Path(p).write_text(text, encoding="utf-8")), json_path))
    except BaseException:
        for tmp, _ in pairs:
            lifecycle.remove(tmp)
        raise
    publish_together(pairs, overwrite)
