"""A benchmark child process: it prints its JSON on one marked line of its stdout."""
from __future__ import annotations

import json
import subprocess
import time

MARK = "ISOLATED "   # the line of the child's stdout that carries its JSON


def run_child(cmd: list[str], label: str, timeout: float | None = None) -> dict | None:
    """The JSON that a `bench.py --isolated ...` process prints on its MARK line, with its
    process_s (start to exit); None, said in one line, if it failed or ran past `timeout` seconds."""
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        tail = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        print(tail.rstrip()[-3000:] + f"\n{label} stopped: still running after {timeout:.0f} s", flush=True)
        return None
    print(p.stderr.rstrip()[-3000:], flush=True)
    lines = [line for line in p.stdout.splitlines() if line.startswith(MARK)]
    if p.returncode != 0 or not lines:
        print(f"{label} failed (exit {p.returncode})", flush=True)
        return None
    res = json.loads(lines[-1][len(MARK):])
    res["process_s"] = time.perf_counter() - t0
    return res
