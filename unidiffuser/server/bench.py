"""Benchmark the server over HTTP against the Python API, in one run.

    python -m unidiffuser.server.bench --model-dir model --json docs/server-bench.json
    python -m unidiffuser.server.bench --model-dir tiny --device cpu --concurrency 1 2 --requests 4 \\
        --steps 2 --size 64                            # CPU, tiny weights: a quick check that it runs

1. The Python API, serially, in a process of its own: `--requests` images one at a time (one
   prompt, one seed, batch 1 each), after one warm-up image; it keeps the PNGs.
2. The server (serve.py, a subprocess on a free port, the same device and dtype), for each
   `--concurrency` C: C client threads, each with the official openai client, send the same
   `--requests` requests (n=1, the same prompts and seeds) as fast as they are answered, after
   warm-up rounds at that concurrency; the server warms every batch size up to --max-batch at
   start (--warm-batches), so no graph capture is timed. Measured: images/s over the wall time, latency p50/p99 per request, the mean images
   per model call the server formed, and each image against the API's image of the same seed
   (max abs pixel difference: 0 when the batch is the same, batched arithmetic's rounding else).

The two never run at the same time. Prints a table and writes --json.
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import math
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = ["an elephant under the sea", "a red cube on a blue sphere", "a lighthouse at dusk, oil painting",
           "two cats playing chess", "a bowl of ramen, studio photo", "a mountain village in winter",
           "a robot reading a book", "a field of sunflowers under a storm"]


def job(i: int, seed0: int) -> tuple[str, int]:
    return PROMPTS[i % len(PROMPTS)], seed0 + i


def percentile(xs: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


# ---- 1. the Python API, serially, in its own process ---------------------------------------------
def api_worker(args) -> int:
    from unidiffuser import UniDiffuser

    out = Path(args.api_worker)
    t0 = time.perf_counter()
    pipe = UniDiffuser.load(args.model_dir, device=args.device, dtype=args.dtype)
    load_s = time.perf_counter() - t0
    size = args.size or pipe.default_size
    kw = dict(steps=args.steps, scale=args.scale, height=size, width=size)
    for i in range(max(1, args.warmup_rounds)):
        pipe("warm-up", seed=i, **kw)
    lat, images = [], []
    start = time.perf_counter()
    for i in range(args.requests):
        prompt, seed = job(i, args.seed)
        t = time.perf_counter()
        images.append((seed, pipe(prompt, seed=seed, **kw).images[0]))
        lat.append(time.perf_counter() - t)
    wall = time.perf_counter() - start
    for seed, img in images:          # after the clock: the server's PNG encoding is its own cost
        img.save(out / f"{seed}.png")
    (out / "api.json").write_text(json.dumps({
        "path": "python-api-serial", "concurrency": 1, "requests": args.requests, "images": args.requests,
        "wall_s": wall, "images_per_s": args.requests / wall, "p50_s": percentile(lat, 50),
        "p99_s": percentile(lat, 99), "mean_batch_images": 1.0, "load_s": load_s, "size": size,
        "device": str(pipe.pipeline.device), "dtype": pipe.precision}))
    return 0


def run_api(args, folder: Path) -> dict:
    cmd = [sys.executable, "-m", "unidiffuser.server.bench", "--api-worker", str(folder), *common_args(args)]
    r = subprocess.run(cmd, cwd=ROOT, env=child_env(), capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"error: the Python API run failed (exit {r.returncode}):\n{r.stderr[-3000:]}")
    return json.loads((folder / "api.json").read_text())


# ---- 2. the server over HTTP ---------------------------------------------------------------------
class ServerProcess:
    def __init__(self, args, log_path: Path):
        cmd = [sys.executable, str(ROOT / "serve.py"), "--model-dir", str(args.model_dir), "--port", "0",
               "--max-batch", str(args.max_batch), "--batch-wait-ms", str(args.batch_wait_ms),
               "--max-queue", str(max(64, 2 * max(args.concurrency))), "--request-timeout-s", "3600",
               "--warm-batches", "--tasks", "t2i"]      # text to image is what is measured: warm it alone
        if args.device:
            cmd += ["--device", args.device]
        if args.dtype:
            cmd += ["--dtype", args.dtype]
        self.log_path = log_path
        self.log = open(log_path, "w")
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=child_env(), stdout=self.log, stderr=subprocess.STDOUT)
        self.url = self._wait_ready(args.start_timeout_s)
        # process start -> /health 200, with every batch size warmed (--warm-batches)
        self.ready_s = round(time.perf_counter() - t0, 3)
        self.ready_line = next((line for line in self.log_path.read_text().splitlines() if "ready: " in line), None)

    def _wait_ready(self, timeout: float) -> str:
        end, url = time.monotonic() + timeout, None
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise SystemExit(f"error: serve.py exited {self.proc.returncode}:\n{self.log_path.read_text()[-3000:]}")
            if url is None:
                m = re.search(r"serving on (http://\S+)", self.log_path.read_text())
                url = m and m[1]
            if url:
                try:
                    with urllib.request.urlopen(url + "/health", timeout=5) as r:
                        if r.status == 200:
                            return url
                except OSError:
                    pass
            time.sleep(0.2)
        self.stop()
        raise SystemExit(f"error: serve.py was not ready after {timeout} s:\n{self.log_path.read_text()[-3000:]}")

    def model_card(self) -> dict:
        with urllib.request.urlopen(self.url + "/v1/models", timeout=10) as r:
            return json.load(r)["data"][0]

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        self.log.close()
        return rc


def run_level(client, args, concurrency: int, size: int, reference: Path | None) -> dict:
    import numpy as np
    from PIL import Image

    def one(i: int, record: bool):
        prompt, seed = job(i, args.seed)
        t = time.perf_counter()
        r = client.images.generate(prompt=prompt, n=1, size=f"{size}x{size}",
                                   extra_body={"seed": seed, "num_inference_steps": args.steps,
                                               "guidance_scale": args.scale})
        lat = time.perf_counter() - t
        if not record:
            return None
        item = r.data[0]
        got_seed = (item.model_extra or {}).get("seed")
        return lat, (r.model_extra or {}).get("settings", {}).get("batch_images", 1), got_seed == seed, seed, item.b64_json

    def pixel_diff(seed: int, b64: str) -> int:
        img = np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"), dtype=np.int16)
        ref = np.asarray(Image.open(reference / f"{seed}.png").convert("RGB"), dtype=np.int16)
        return int(np.abs(img - ref).max()) if img.shape == ref.shape else 255

    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(lambda i: one(i, False), range(concurrency * args.warmup_rounds)))   # warm-up round(s)
        start = time.perf_counter()
        results = list(pool.map(lambda i: one(i, True), range(args.requests)))
        wall = time.perf_counter() - start
    lat = [r[0] for r in results]
    # After the clock: a client thread that decoded its image before sending the next request
    # would hold the others back (one GIL), and the server's batches would look smaller.
    diffs = [pixel_diff(r[3], r[4]) for r in results] if reference is not None else []
    return {"path": "http-server", "concurrency": concurrency, "requests": args.requests, "images": args.requests,
            "wall_s": wall, "images_per_s": args.requests / wall, "p50_s": percentile(lat, 50),
            "p99_s": percentile(lat, 99), "mean_batch_images": sum(r[1] for r in results) / len(results),
            "seeds_ok": all(r[2] for r in results),
            "max_pixel_diff_vs_api": max(diffs) if diffs else None,
            "identical_to_api": sum(d == 0 for d in diffs)}


def common_args(args) -> list[str]:
    out = ["--model-dir", str(args.model_dir), "--requests", str(args.requests), "--steps", str(args.steps),
           "--scale", str(args.scale), "--seed", str(args.seed)]
    for flag, v in (("--device", args.device), ("--dtype", args.dtype), ("--size", args.size)):
        if v is not None:
            out += [flag, str(v)]
    return out


def child_env() -> dict:
    path = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    return {**os.environ, "PYTHONPATH": path}


def table(rows: list[dict], api: dict) -> str:
    lines = ["| path | concurrency | images/s | vs API serial | p50 (s) | p99 (s) | images per call | max px diff vs API |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in [api, *rows]:
        diff = r.get("max_pixel_diff_vs_api")
        lines.append(f"| {'Python API, serial' if r is api else 'HTTP server (openai client)'} | {r['concurrency']} | "
                     f"{r['images_per_s']:.3f} | {r['images_per_s'] / api['images_per_s']:.2f}x | {r['p50_s']:.3f} | "
                     f"{r['p99_s']:.3f} | {r['mean_batch_images']:.2f} | {'' if diff is None else diff} |")
    return "\n".join(lines)


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip() or None
    except OSError:
        return None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m unidiffuser.server.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", type=Path, required=True)
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--dtype", help="as serve.py (default fp16 on CUDA, fp32 on CPU)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8, 16])
    p.add_argument("--requests", type=int, default=64, help="timed requests per level, n=1 each (default 64)")
    p.add_argument("--warmup-rounds", type=int, default=2, help="untimed rounds of C requests before each level "
                   "(the API: this many images)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--scale", type=float, default=7.0)
    p.add_argument("--size", type=int, help="image side (default: the model's, 512 for v1)")
    p.add_argument("--seed", type=int, default=1000, help="request i uses seed + i")
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--batch-wait-ms", type=float, default=10.0)
    p.add_argument("--start-timeout-s", type=float, default=900.0)
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--api-worker", help=argparse.SUPPRESS)    # internal: the Python API's own process
    args = p.parse_args(argv)
    if args.api_worker:
        return api_worker(args)
    if args.requests < 1 or min(args.concurrency) < 1:
        p.error("--requests and --concurrency must be >= 1")

    from openai import OpenAI

    with tempfile.TemporaryDirectory(prefix="unidiffuser-server-bench-") as tmp:
        tmp = Path(tmp)
        print(f"Python API, serially, in its own process: {args.requests} images", file=sys.stderr, flush=True)
        api = run_api(args, tmp)
        size = api["size"]
        server = ServerProcess(args, tmp / "server.log")
        rows, card = [], {}
        try:
            card = server.model_card()
            client = OpenAI(base_url=server.url + "/v1", api_key="bench", max_retries=0, timeout=3600)
            for c in args.concurrency:
                print(f"server, concurrency {c}: {args.requests} requests", file=sys.stderr, flush=True)
                rows.append(run_level(client, args, c, size, tmp))
        finally:
            rc = server.stop()
        metrics_note = None if rc == 0 else f"serve.py exited {rc} on SIGTERM"
    print(table(rows, api))
    result = {
        "what": "UniDiffuser image server over HTTP (openai client) against the Python API, serially",
        "command": " ".join([os.path.basename(sys.executable), "-m", "unidiffuser.server.bench", *(argv or sys.argv[1:])]),
        "git_commit": git_commit(), "host": platform.node(), "python": platform.python_version(),
        "settings": {"size": size, "steps": args.steps, "scale": args.scale, "requests": args.requests,
                     "max_batch": args.max_batch, "batch_wait_ms": args.batch_wait_ms, "seed": args.seed,
                     "warmup_rounds": args.warmup_rounds},
        "model": card, "api_serial": api, "server_ready_s": server.ready_s, "server_ready_line": server.ready_line,
        "server": rows, "server_exit": rc, "note": metrics_note,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}", file=sys.stderr)
    bad = [r["concurrency"] for r in rows if not r["seeds_ok"]]
    if bad or rc != 0:
        print(f"error: {'wrong seeds at concurrency ' + str(bad) if bad else ''} {metrics_note or ''}".strip(),
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
