"""What every command does around its main(): log to the terminal, and turn a bad input
(CheckpointError and EngineError are ValueErrors) into one clear line and exit code 2."""
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
