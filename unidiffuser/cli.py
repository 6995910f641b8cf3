"""What every command does around its main(): log to the terminal, and turn a bad input
(CheckpointError and EngineError are ValueErrors; a failed write is an OSError) into one clear
line and exit code 2; Ctrl-C exits 130 without a traceback. The library names parameters
(limits.InputError); here each is spelled as the command's flag: `n` -> `--n`, unless `flags`
says otherwise (run.py: n -> --n-samples).

Commands import torch and the networks inside main(), after their arguments are checked, so
that --help and argument errors answer at once (importing torch alone takes seconds)."""
from __future__ import annotations

import logging
import os
import sys
from typing import Callable, NoReturn

from .limits import InputError


def flag(name: str, flags: dict[str, str] | None = None) -> str:
    return (flags or {}).get(name) or "--" + name.replace("_", "-")


def run(main: Callable[[], int], flags: dict[str, str] | None = None) -> NoReturn:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        code = main()
        # Done: every file is written and closed. Skip the interpreter's teardown, which frees the
        # networks, CUDA graphs and their memory pools one object at a time (1-2.5 s after a v1
        # run); the OS takes the whole process back at once.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code or 0)
    except (ValueError, OSError) as e:
        text = e.render(lambda name: flag(name, flags)) if isinstance(e, InputError) else str(e)
        print(f"error: {text}", file=sys.stderr)
        sys.exit(2)
    except SystemExit as e:
        if isinstance(e.code, str):   # SystemExit("error: ...") of a library check: an input error too
            print(e.code if e.code.startswith("error") else f"error: {e.code}", file=sys.stderr)
            sys.exit(2)
        raise
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
