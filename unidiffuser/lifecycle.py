"""Stopping at any moment without leaving anything behind, and cleaning up after runs that could not.

- `install()`: SIGTERM, SIGINT and SIGHUP raise `Stopped` in the main thread (like Ctrl-C's
  KeyboardInterrupt), so every `finally` that removes a temporary file or folder runs; the command
  then exits 128 + the signal's number (cli.run). Inside `deferred()` (a few renames that must
  happen together, such as a PNG and its sidecar) the signal waits until the block ends.
- Temporary files and folders get names that say whose they are (`marked`):
  `.NAME.unidiffuser-tmp-HOST-PID-START-RANDOM[.SUFFIX]`: HOST a hash of the host name, PID the
  writing process and START its start time (so a reused pid is not taken for the writer).
  While they exist they are `own`ed: whatever a `finally` did not get to, `remove_owned` removes
  on the way out.
- A process killed with SIGKILL (or by the OOM killer) runs no code. The next run `sweep`s the
  folders it writes to and the temporary directory: entries with our mark, of this host, whose
  process is gone, are removed (or, for a model folder set aside during a swap that never
  finished, put back), in one log line. Nothing else is ever touched.

No torch here: the commands install this in their first milliseconds, and a server can use it too.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger("unidiffuser")

SIGNALS = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGINT", "SIGHUP") if hasattr(signal, n))
MARK = "unidiffuser"
KINDS = ("tmp", "old")    # a file or folder being written; a model folder set aside while another is swapped in


class Stopped(SystemExit):
    """The process was asked to stop (SIGTERM, SIGINT, SIGHUP). Not an Exception (`except
    Exception` does not swallow it, `finally` blocks run); uncaught, the interpreter exits with
    its code, 128 + the signal's number, without a traceback."""

    def __init__(self, signum: int):
        super().__init__(128 + signum)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


_state = {"depth": 0, "pending": None, "stopping": False}
_previous: dict[int, object] = {}


def _handler(signum, frame):
    if _state["stopping"]:        # already on the way out: the first signal is being handled
        return
    if _state["depth"]:
        _state["pending"] = _state["pending"] or signum
        return
    _state["stopping"] = True
    raise Stopped(signum)


def install() -> bool:
    """Make SIGTERM, SIGINT and SIGHUP raise Stopped (main thread only; a signal the process was
    started with ignored, as under nohup, stays ignored). Returns whether they were installed."""
    if threading.current_thread() is not threading.main_thread():
        return False
    _state.update(depth=0, pending=None, stopping=False)
    for s in SIGNALS:
        before = signal.getsignal(s)
        if before is not signal.SIG_IGN and before is not _handler:
            _previous[s] = before
            signal.signal(s, _handler)
    return True


def uninstall() -> None:
    """The handlers install() replaced, back (a command that ends inside a test's process)."""
    if threading.current_thread() is not threading.main_thread():
        return
    while _previous:
        s, before = _previous.popitem()
        signal.signal(s, before if before is not None else signal.SIG_DFL)


def stopping() -> None:
    """On the way out: a further signal no longer interrupts the clean-up."""
    _state["stopping"] = True


@contextmanager
def deferred():
    """A signal arriving inside the block stops the process when the block ends, not inside it."""
    _state["depth"] += 1
    try:
        yield
    finally:
        _state["depth"] -= 1
        if not _state["depth"] and _state["pending"] is not None and not _state["stopping"]:
            signum, _state["pending"] = _state["pending"], None
            _state["stopping"] = True
            raise Stopped(signum)


# -- names that say whose a temporary is ---------------------------------------------------------

def _host() -> str:
    return hashlib.sha256(socket.gethostname().encode("utf-8", "replace")).hexdigest()[:8]


HOST = _host()


def start_ticks(pid: int) -> str | None:
    """When process pid started (clock ticks since boot, Linux), or None when not known."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError, ValueError):
        return None


def marked(name: str, suffix: str = "", kind: str = "tmp") -> str:
    """A hidden name beside `name` that carries this program's mark, this host and process."""
    assert kind in KINDS
    pid = os.getpid()
    return f".{name}.{MARK}-{kind}-{HOST}-{pid}-{start_ticks(pid) or 0}-{secrets.token_hex(4)}{suffix}"


_NAME = re.compile(rf"\.(?P<name>.+)\.{MARK}-(?P<kind>{'|'.join(KINDS)})-(?P<host>[0-9a-f]{{8}})-(?P<pid>\d+)-"
                   rf"(?P<start>\d+)-[0-9a-f]{{8}}(?:\.[^.]*)?")


def parse(name: str) -> dict | None:
    m = _NAME.fullmatch(name)
    return m.groupdict() if m else None


def alive(pid: int, start: str) -> bool:
    """Whether the process that wrote a temporary (pid, start ticks) may still run. In doubt: yes."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError, OSError):
        return True   # another user's process, or a pid this system cannot have: leave it
    now = start_ticks(pid)
    return start == "0" or now is None or now == start


# -- what this process owns while it runs --------------------------------------------------------

_owned: dict[str, bool] = {}     # path -> is a folder, in creation order
_lock = threading.Lock()


def own(path: Path, folder: bool = False) -> None:
    with _lock:
        _owned[str(path)] = folder


def disown(path: Path) -> None:
    with _lock:
        _owned.pop(str(path), None)


def remove(path: Path) -> None:
    """Remove a temporary file or folder of ours (gone already: nothing to do) and disown it."""
    p = Path(path)
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        try:
            p.unlink()
        except FileNotFoundError:
            pass
    if not os.path.lexists(p):
        disown(p)


def remove_owned() -> list[str]:
    """Remove everything still owned (newest first); returns what existed. Called on the way out."""
    with _lock:
        paths = list(reversed(_owned))
    gone = []
    for p in paths:
        if os.path.lexists(p):
            gone.append(p)
        try:
            remove(Path(p))
        except OSError:
            pass
    return gone


# -- after a run that was killed -----------------------------------------------------------------

_swept: set[str] = set()


def sweep(folder: Path) -> list[str]:
    """Remove what runs of this program that were killed left in `folder`: entries with our mark,
    written on this host by a process that no longer runs. A model folder set aside during a swap
    that never finished (its place is empty) is put back instead. One log line says what was done."""
    folder = Path(folder)
    try:
        _swept.add(str(folder.resolve()))
        entries = list(os.scandir(folder))
    except OSError:
        return []
    removed, restored = [], []
    for entry in sorted(entries, key=lambda e: e.name):
        m = parse(entry.name)
        if m is None or m["host"] != HOST or entry.is_symlink() or alive(int(m["pid"]), m["start"]):
            continue
        path, home = folder / entry.name, folder / m["name"]
        try:
            if m["kind"] == "old" and entry.is_dir() and not os.path.lexists(home):
                os.rename(path, home)    # killed between the two renames of a swap: the old folder is still the folder
                restored.append(f"{home.name} (from {entry.name})")
                continue
            if entry.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
        except OSError:
            continue      # another run cleaning up too, or not ours to remove (permissions)
        removed.append(entry.name)
    if removed or restored:
        log.info("%s: cleaned up after stopped runs of this program: %s", folder, "; ".join(
            filter(None, [f"removed {', '.join(removed)}" if removed else "",
                          f"put back {', '.join(restored)}" if restored else ""])))
    return removed + restored


def sweep_once(folder: Path) -> None:
    """sweep(folder), the first time this process writes there."""
    try:
        key = str(Path(folder).resolve())
    except OSError:
        return
    if key not in _swept:
        sweep(folder)


def temp_root() -> Path:
    return Path(tempfile.gettempdir())
