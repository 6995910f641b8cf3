"""What every command does around its main(): log to the terminal, and turn a bad input
(CheckpointError and EngineError are ValueErrors; a failed write is an OSError) into one clear
line and exit code 2; an allocation that fails (torch's or Python's out of memory) is one line
and exit 2 too. SIGTERM, SIGINT (Ctrl-C) and SIGHUP stop it at any moment with exit code 128 +
the signal's number and no traceback, leaving no temporary file or folder behind (lifecycle.py);
what a killed run left is swept by the next. The library names parameters (limits.InputError);
here each is spelled as the command's flag: `n` -> `--n`, unless `flags` says otherwise
(run.py: n -> --n-samples).

Under torchrun every rank runs this. A rank that stops because another one failed
(`Quiet`) exits 2 without a line of its own, and a rank stopped by a signal prints nothing
(torchrun stops them all and says so); before the process group exists, the checks are the
same on every rank of a node, so only its first rank (LOCAL_RANK 0) prints an error, unless
the error is this rank's alone (`every_rank` set on it).

Commands import torch and the networks inside main(), after their arguments are checked, so
that --help and argument errors answer at once (importing torch alone takes seconds)."""
from __future__ import annotations

import logging
import os
import signal
import sys
import time
from typing import Callable, NoReturn

from . import lifecycle
from .limits import InputError


class Quiet(Exception):
    """Stop with exit code 2 without printing: another rank failed, and it says why."""


def flag(name: str, flags: dict[str, str] | None = None) -> str:
    return (flags or {}).get(name) or "--" + name.replace("_", "-")


def _world_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE") or 1)
    except ValueError:
        return 1


def speaks(e: BaseException | None = None) -> bool:
    """Whether this process prints its error or stop (see the module's doc: torchrun)."""
    if _world_size() <= 1 or getattr(e, "every_rank", False):
        return True
    dist = sys.modules.get("torch.distributed")
    try:
        if dist is not None and dist.is_available() and dist.is_initialized():
            return True
    except Exception:
        pass
    return os.environ.get("LOCAL_RANK", "0") == "0"


_flags: dict[str, str] | None = None   # the running command's (run)
SILENT_RANK_DELAY_S = 3.0


def error_line(e: BaseException) -> str:
    """The one line run prints for an input error."""
    return "error: " + (e.render(lambda name: flag(name, _flags)) if isinstance(e, InputError) else str(e))


def say(e: BaseException) -> None:
    """Print e's line now (under torchrun, before the ranks leave together); run then prints nothing."""
    print(error_line(e), file=sys.stderr, flush=True)
    e.said = True


def _leave(code: int, line: str | None = None) -> NoReturn:
    """Remove what this process still owns, print `line`, and exit with `code` (SystemExit, so
    that a caller in the same process, such as a test, sees the code)."""
    lifecycle.stopping()
    lifecycle.remove_owned()
    lifecycle.uninstall()
    if line:
        print(line, file=sys.stderr)
    elif code and _world_size() > 1:
        # A rank that stays silent (its node's first rank says the line) lets that rank speak
        # first: torchrun stops every rank as soon as one exits, even one that was about to print.
        time.sleep(SILENT_RANK_DELAY_S)
    sys.exit(code)


def run(main: Callable[[], int], flags: dict[str, str] | None = None) -> NoReturn:
    global _flags
    _flags = flags
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    lifecycle.install()
    try:
        try:
            lifecycle.sweep(lifecycle.temp_root())   # what killed runs left in the temporary directory
            code = main()
            # Done: every file is written and closed. Skip the interpreter's teardown, which frees the
            # networks, CUDA graphs and their memory pools one object at a time (1-2.5 s after a v1
            # run); the OS takes the whole process back at once.
            lifecycle.stopping()
            lifecycle.remove_owned()
            logging.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
            if "pytest" in sys.modules:   # a test calling a command in-process: end the call, not the test run
                sys.exit(code or 0)
            os._exit(code or 0)
        except lifecycle.Stopped:
            raise
        except Quiet:
            _leave(2)
        except (ValueError, OSError) as e:
            _leave(2, error_line(e) if speaks(e) and not getattr(e, "said", False) else None)
        except (MemoryError, RuntimeError) as e:
            from .memory import out_of_memory
            if not out_of_memory(e):
                raise
            what = getattr(e, "unidiffuser_context", None) or "out of memory"
            first = (str(e).strip().splitlines() or [""])[0][:300]
            _leave(2, f"error: {what} ({type(e).__name__}: {first}); nothing half-written was left"
                   if speaks(e) else None)
        except SystemExit as e:
            if isinstance(e.code, str):   # SystemExit("error: ...") of a library check: an input error too
                _leave(2, (e.code if e.code.startswith("error") else f"error: {e.code}") if speaks(e) else None)
            _leave(e.code if isinstance(e.code, int) else 0)
        except KeyboardInterrupt:         # raised without our handler (before install, or by a library)
            _leave(128 + signal.SIGINT, "interrupted" if _world_size() <= 1 else None)
    except lifecycle.Stopped as e:        # also when it arrives while an error above is being reported
        lifecycle.stopping()
        line = "interrupted" if e.signum == signal.SIGINT else f"stopped by {signal.Signals(e.signum).name}"
        # Under torchrun, the launcher stops every rank when one fails or when it is stopped, and says so.
        _leave(e.exit_code, line if _world_size() <= 1 else None)
    except BaseException:                 # a bug: its traceback, and still nothing left behind
        lifecycle.stopping()
        lifecycle.remove_owned()
        raise
