"""What every command does around its main(): log to the terminal, and turn a bad input
(CheckpointError and EngineError are ValueErrors; a failed write is an OSError) into one clear
line and exit code 2; Ctrl-C exits 130 without a traceback.

Commands import torch and the networks inside main(), after their arguments are checked, so
that --help and argument errors answer at once (importing torch alone takes seconds)."""
from __future__ import annotations

import logging
import sys
from typing import Callable, NoReturn


def run(main: Callable[[], int]) -> NoReturn:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        sys.exit(main())
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except SystemExit as e:
        if isinstance(e.code, str):   # SystemExit("error: ...") of a library check: an input error too
            print(e.code if e.code.startswith("error") else f"error: {e.code}", file=sys.stderr)
            sys.exit(2)
        raise
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
