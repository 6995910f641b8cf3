"""serve.py: check the arguments (before torch), bind, answer /health 503 while the model loads
and warms up, then serve; SIGTERM drains (new requests 503, the running batch finishes) and
exits 0.

    python serve.py --model-dir model [--host 127.0.0.1] [--port 8000] [--device cuda:N]
                    [--dtype fp16|bf16|fp8|fp32] [--max-batch 8] [--batch-wait-ms 10] [--max-queue 64]
                    [--api-key KEY] [--request-timeout-s 300] [--warm-batches] [--max-side 4096]
                    [--tasks t2i,i2t,...] [--max-upload-mib 16]
"""
from __future__ import annotations

import argparse
import importlib
import ipaddress
import logging
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

from .. import cli, limits, options
from ..tasks import TASKS as LIBRARY_TASKS

log = logging.getLogger("unidiffuser.server")

API_KEY_ENV = "UNIDIFFUSER_API_KEY"


class Parser(argparse.ArgumentParser):
    def error(self, message):                # one line naming the flag, exit 2 (the commands' style)
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def parse_args(argv=None):
    p = Parser(prog="serve.py", description="An OpenAI-compatible image server for UniDiffuser "
               "(POST /v1/images/generations, /v1/images/variations, /v1/images/captions, /v1/generations; "
               "a web page at /). See docs/server.md.")
    p.add_argument("--model-dir", type=Path, required=True, help="converted model folder (convert_weights.py)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; any other than "
                   "a loopback address needs --api-key)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000; 0: any free port, printed)")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default cuda when available, else cpu)")
    p.add_argument("--dtype", choices=options.PRECISIONS, help="network precision (default fp16 on CUDA, fp32 on CPU; "
                   "fp8: Hopper or newer)")
    p.add_argument("--max-batch", type=int, default=8, help="most images in one model call (default 8)")
    p.add_argument("--batch-wait-ms", type=float, default=10.0, help="how long a batch waits for the next request "
                   "to join it, restarted by each arrival, at most 5x in all (default 10)")
    p.add_argument("--max-queue", type=int, default=64, help="most requests waiting; more get 429 (default 64)")
    p.add_argument("--api-key", help=f"require 'Authorization: Bearer KEY' (or set {API_KEY_ENV})")
    p.add_argument("--request-timeout-s", type=float, default=300.0, help="a request still waiting for its batch "
                   "after this long gets 503 (default 300)")
    p.add_argument("--warm-batches", action="store_true", help="also warm every batch size 2..--max-batch of every "
                   "served task at the default size before ready (on the CUDA fast path each pays its graph capture once)")
    p.add_argument("--max-side", type=int, default=limits.MAX_SIDE, help="largest image side a request may ask for "
                   f"(default {limits.MAX_SIDE}, the CLI's limit)")
    p.add_argument("--tasks", help=f"comma-separated tasks to serve, of {','.join(LIBRARY_TASKS)} (default: every "
                   "task the model folder has the networks of); each is warmed up before ready")
    p.add_argument("--max-upload-mib", type=float, default=16, help="largest multipart body (an uploaded image "
                   "and its fields) in MiB; larger gets 413 (default 16)")
    return p.parse_args(argv)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False                  # a host name: may resolve to anything


def check_arguments(args) -> None:
    """Everything that needs neither torch nor the weights."""
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in 0..65535, got {args.port}")
    if not 1 <= args.max_batch <= limits.MAX_BATCH:
        raise ValueError(f"--max-batch must be in 1..{limits.MAX_BATCH}, got {args.max_batch}")
    if not 0 <= args.batch_wait_ms <= 60_000:
        raise ValueError(f"--batch-wait-ms must be in 0..60000, got {args.batch_wait_ms}")
    if not 1 <= args.max_queue <= 100_000:
        raise ValueError(f"--max-queue must be in 1..100000, got {args.max_queue}")
    if not 0 < args.request_timeout_s <= 86_400:
        raise ValueError(f"--request-timeout-s must be in (0, 86400], got {args.request_timeout_s}")
    limits.check_side("max_side", args.max_side)
    if args.tasks is not None:
        names = [t.strip() for t in args.tasks.split(",") if t.strip()]
        unknown = [t for t in names if t not in LIBRARY_TASKS]
        if not names or unknown or len(set(names)) != len(names):
            raise ValueError(f"--tasks must be distinct names of {', '.join(LIBRARY_TASKS)}, comma-separated, "
                             f"got {args.tasks!r}")
        args.tasks = names
    from ..images import MAX_FILE_BYTES
    if not 0 < args.max_upload_mib <= MAX_FILE_BYTES >> 20:
        raise ValueError(f"--max-upload-mib must be in (0, {MAX_FILE_BYTES >> 20}] (the CLI's largest image file), "
                         f"got {args.max_upload_mib}")
    options.check_syntax(args.device, args.dtype)      # the rules run.py and the API check too
    if args.api_key is None:
        args.api_key = os.environ.get(API_KEY_ENV) or None
    if args.api_key is not None and (not args.api_key.strip() or not args.api_key.isprintable()
                                     or not args.api_key.isascii() or " " in args.api_key):
        raise ValueError("--api-key must be printable ASCII without spaces")
    if not is_loopback(args.host) and args.api_key is None:
        raise ValueError(f"--host {args.host} is not a loopback address: serving it needs --api-key KEY "
                         f"(or {API_KEY_ENV}); clients then send 'Authorization: Bearer KEY'")
    if not args.model_dir.is_dir():
        raise ValueError(f"--model-dir {args.model_dir}: model folder not found (make one with convert_weights.py)")
    if not (args.model_dir / "config.json").is_file():
        raise ValueError(f"--model-dir {args.model_dir}: no config.json, not a folder written by convert_weights.py")


def bind(host: str, port: int) -> socket.socket:
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM,
                                                          flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(2048)
        sock.set_inheritable(True)
    except OSError as e:
        raise ValueError(f"--host {host} --port {port}: cannot listen there ({e.strerror or e})") from None
    return sock


def served_tasks(pipe, requested: list[str] | None) -> tuple[dict, list[str]]:
    """The tasks to serve: the requested ones (each must have its networks in the model folder),
    or every task the folder has the networks of; and what was left out, said in a line each."""
    from . import tasks
    skipped = []
    names = requested or list(tasks.TASKS)
    served = {}
    for name in names:
        missing = tasks.missing_networks(pipe.pipeline.manifest, name)
        if missing and requested:
            raise ValueError(f"--tasks {name}: the model folder {pipe.model_dir} has no {', '.join(missing)} "
                             "(converted before the image and caption networks); re-run convert_weights.py, "
                             "or leave the task out")
        if missing:
            skipped.append(f"{name} (no {', '.join(missing)})")
        else:
            served[name] = tasks.TASKS[name]
    return served, skipped


def warm_up(pipe, served: dict, batches) -> None:
    """One tiny run (one step at the default size) of every served task per batch size: the first
    request of a task does not pay loading its networks, nor (on the CUDA fast path) a graph capture
    at the default size and scale."""
    from PIL import Image

    size = pipe.default_size
    inputs = {"prompt": "warm-up", "image": Image.new("RGB", (size, size), (128, 128, 128)), None: None}
    for b in batches:
        for name, task in served.items():
            x = inputs[task.input]
            pipe.generate(name, None if x is None else [x] * b, n=b if x is None else 1, seeds=list(range(b)),
                          batch=b, steps=1)


def load(state, args) -> None:
    """In a thread while /health answers 503: import torch, load, warm the default size; then
    this thread runs the model for the batcher until the process exits."""
    try:
        opts = options.resolve(args.device, args.dtype)     # the front door run.py and the API use
        from unidiffuser import UniDiffuser
        t0 = time.perf_counter()
        pipe = UniDiffuser.from_options(args.model_dir, opts)
        served, skipped = served_tasks(pipe, args.tasks)
        if skipped:
            log.info("not serving %s: the model folder was converted before the image and caption networks",
                     "; ".join(skipped))
        t1 = time.perf_counter()
        state.status, state.reason = "warming", (f"warming up {', '.join(served)} at "
                                                 f"{pipe.default_size}x{pipe.default_size}")
        warm_up(pipe, served, range(1, args.max_batch + 1) if args.warm_batches else (1,))
        t2 = time.perf_counter()
        info = {"default_size": pipe.default_size, "dtype": pipe.precision, "backend": pipe.backend,
                "device": opts.device, "random_weights": pipe.random_weights}
        log.info("ready: loaded in %.2f s, warmed up in %.2f s (%s, %s, %s, tasks %s%s)", t1 - t0, t2 - t1, opts.device,
                 pipe.precision, f"{pipe.default_size}x{pipe.default_size}", ",".join(served),
                 ", RANDOM weights" if pipe.random_weights else "")
        batcher = state.ready(pipe, info, served)
    except (ValueError, OSError) as e:
        state.fail(e.render(cli.flag) if isinstance(e, limits.InputError) else str(e))
        return
    except Exception as e:            # noqa: BLE001 - said in one line, the traceback logged
        log.exception("loading failed")
        state.fail(f"loading failed: {type(e).__name__}: {e}")
        return
    batcher.work()                    # this thread, which loaded and warmed the model, runs every call


def main(argv=None) -> int:
    args = parse_args(argv)
    check_arguments(args)
    try:
        importlib.import_module("fastapi")
        importlib.import_module("uvicorn")
    except ImportError as e:
        raise ValueError(f"the server needs fastapi and uvicorn ({e}): pip install -r requirements.txt") from None
    sock = bind(args.host, args.port)

    from .app import create_app
    from .state import ServerConfig, ServerState

    config = ServerConfig(api_key=args.api_key, max_batch=args.max_batch, batch_wait_ms=args.batch_wait_ms,
                          max_queue=args.max_queue, request_timeout_s=args.request_timeout_s, max_side=args.max_side,
                          max_upload=int(args.max_upload_mib * (1 << 20)))
    state = ServerState(config)
    import uvicorn

    server = Server(uvicorn.Config(create_app(state), log_level="info", access_log=False, lifespan="off",
                                   timeout_graceful_shutdown=30, timeout_keep_alive=5), state)

    state.stop = lambda: setattr(server, "should_exit", True)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(f"serving on http://{shown}:{port} (loading the model: /health answers 503 until it is ready)",
          file=sys.stderr, flush=True)
    threading.Thread(target=load, args=(state, args), name="unidiffuser-model", daemon=True).start()
    server.run(sockets=[sock])
    if state.failure is not None:
        raise ValueError(state.failure)
    log.info("stopped")
    return 0


try:
    from uvicorn import Server as _UvicornServer
except ImportError:                   # main() says what to install
    _UvicornServer = object


class Server(_UvicornServer):
    """uvicorn's server with a draining exit: on SIGTERM (or Ctrl-C) new requests and /health get
    503, queued requests are answered 503, the running batch finishes and is answered, then the
    process exits 0. A second signal exits at once."""

    def __init__(self, config, state):
        super().__init__(config)
        self.state = state

    def handle_exit(self, sig, frame) -> None:
        # Never recorded for re-raising (uvicorn would re-raise it after serving: exit -15).
        if self.state.status == "draining" or self.state.batcher is None:
            if self.should_exit and sig == signal.SIGINT:
                self.force_exit = True
            self.should_exit = True
            return
        self.state.status, self.state.reason = "draining", self.state.DRAINING
        # A signal handler must not take the batcher's lock (the loop may hold it): a thread does.
        threading.Thread(target=self._drain, name="unidiffuser-drain", daemon=True).start()

    def _drain(self) -> None:
        log.info("draining: new requests get 503; finishing the running batch")
        self.state.begin_drain()
        self.state.batcher.wait_idle()
        self.should_exit = True
