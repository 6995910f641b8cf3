"""The HTTP side: an OpenAI-compatible Images API, health, metrics, progress and the web page.

    POST /v1/images/generations   text to image (OpenAI's request and response shape, + seed,
                                  num_inference_steps, guidance_scale; each image's seed)
    GET  /v1/requests/{id}        progress of a request in flight (queue position, steps done);
                                  the id is the request's X-Request-Id header (the client's or ours)
    GET  /v1/models[/{id}]        the one model served
    GET  /health                  200 once the model is loaded and warm; 503 with the reason before
                                  and while draining
    GET  /metrics                 Prometheus text format
    GET  /                        the web page (static files under /static, served from here)
    POST /v1/images/variations, POST /v1/images/captions: tasks of UniDiffuser not in this build
                                  (404 "task X is not available in this build")

Nothing in a request names a server path: the model is loaded once at start, images are
answered inline (no files are written), the page's files are fixed.
"""
from __future__ import annotations

import asyncio
import base64
import hmac
import io
import ipaddress
import json
import logging
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Path as PathParam, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import limits
from . import tasks
from .batcher import Batcher, Job, QueueFull
from .errors import APIError, bad
from .metrics import ServerMetrics

log = logging.getLogger("unidiffuser.server")

STATIC = Path(__file__).resolve().parent / "static"
MAX_N = 10                        # images per request, as OpenAI's Images API
MAX_PROMPT_CHARS = 4000           # as OpenAI's dall-e-3; CLIP reads the first 77 tokens anyway
MAX_BODY = 64 * 1024              # bytes of a JSON request body (a prompt and a few numbers)
MAX_SEED = 2**64                  # torch.Generator.manual_seed takes [0, 2**64)
REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
PUBLIC = ("/", "/health", "/favicon.ico")   # and /static/*: no key needed (they hold no data)

# OpenAI's Images API parameters this server has no equivalent for: refused with a 400 naming
# them rather than silently ignored (the official client sends none of them unless asked).
UNSUPPORTED = ("quality", "style", "user", "background", "moderation", "output_compression", "partial_images",
               "stream", "safety_identifier", "input_fidelity", "svg", "complexity", "frame_count",
               "frame_duration_ms")
GENERATION_FIELDS = ("model", "prompt", "n", "size", "response_format", "output_format", "seed",
                     "num_inference_steps", "guidance_scale", "task")


@dataclass
class ServerConfig:
    model_id: str = "unidiffuser"
    api_key: str | None = None
    max_batch: int = 8
    batch_wait_ms: float = 10.0
    max_queue: int = 64
    request_timeout_s: float = 300.0
    max_side: int = limits.MAX_SIDE


class ServerState:
    """What the routes share: the status, the pipeline's batcher once loaded, metrics, jobs."""

    def __init__(self, config: ServerConfig):
        self.config = config
        self.status, self.reason = "loading", "loading the model"
        self.failure: str | None = None
        self.stop = lambda: None          # set by main: stops the HTTP server
        self.batcher: Batcher | None = None
        self.default_size = 512
        self.model_info: dict = {}
        self.jobs: dict[str, Job] = {}
        self.created = int(time.time())
        self.metrics = ServerMetrics(lambda: self.batcher.queue_depth if self.batcher else 0,
                                     lambda: self.batcher.running_images if self.batcher else 0)

    def ready(self, pipe, model_info: dict) -> Batcher:
        """The model is loaded and warm: requests are accepted from now on. The caller runs the
        returned batcher's loop (`work()`), in the thread that loaded the model."""
        self.default_size = pipe.default_size
        self.model_info = model_info
        self.batcher = Batcher(pipe, self.config.max_batch, self.config.batch_wait_ms / 1000, self.config.max_queue,
                               on_batch=self._on_batch)
        self.status, self.reason = "ok", ""
        return self.batcher

    def fail(self, message: str) -> None:
        """Loading failed: the command says `message` in one line and exits 2."""
        self.failure, self.status, self.reason = message, "failed", message
        self.stop()

    def _on_batch(self, jobs: list[Job], outcomes: list) -> None:
        self.metrics.batch_size.observe(outcomes[0].batch_images)
        self.metrics.batch_requests.observe(outcomes[0].batch_requests)
        if outcomes[0].error is not None:
            self.metrics.failed_batches.inc()
        for o in outcomes:
            self.metrics.queue_wait.observe(o.queue_s)

    DRAINING = "shutting down (SIGTERM): finishing the running batch, accepting nothing new"

    def begin_drain(self) -> None:
        self.status, self.reason = "draining", self.DRAINING
        if self.batcher is not None:
            for _ in self.batcher.drain():
                self.metrics.dropped.inc("draining")

    def require_ready(self) -> Batcher:
        if self.status != "ok" or self.batcher is None:
            raise APIError(503, f"the server is not ready: {self.status} ({self.reason})", code=self.status,
                           headers={"Retry-After": "5"} if self.status in ("loading", "warming") else None)
        return self.batcher


# ---- request parsing ---------------------------------------------------------------------------
def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _limit(check, param: str, cli_name: str, *args) -> None:
    """unidiffuser.limits' rule and message, with the API's parameter name for the CLI's flag."""
    try:
        check(*args)
    except ValueError as e:
        raise bad(str(e).replace(f"--{cli_name}", param), param) from None


def parse_size(value, default: int, max_side: int) -> tuple[int, int]:
    """'WxH' (or 'auto' / absent: the model's default) -> (height, width), the CLI's rules."""
    if value is None or value == "auto":
        return default, default
    m = re.fullmatch(r"(\d{1,6})x(\d{1,6})", value) if isinstance(value, str) else None
    if m is None:
        raise bad(f"size must be 'WIDTHxHEIGHT' in pixels (e.g. '{default}x{default}') or 'auto', got {value!r}", "size")
    width, height = int(m[1]), int(m[2])
    for name, side in (("width", width), ("height", height)):
        try:
            limits.check_side(name, side)
        except ValueError as e:
            raise bad(f"size {value}: {str(e).removeprefix('--')}", "size") from None
        if side > max_side:
            raise bad(f"size {value}: {name} must be at most {max_side} on this server (--max-side), got {side}", "size")
    return height, width


def parse_generation(body: dict, state: ServerState) -> tuple[tasks.BatchKey, list[str], list[int]]:
    for k, v in body.items():
        if k in UNSUPPORTED:
            if v is not None:
                raise bad(f"{k} is not supported by this server (UniDiffuser has no such setting); leave it out",
                          k, "unsupported_parameter")
        elif k not in GENERATION_FIELDS:
            raise bad(f"unknown parameter {k!r}; this endpoint takes {', '.join(GENERATION_FIELDS)}", k,
                      "unknown_parameter")
    get = body.get
    model = get("model")
    if model is not None:
        if not isinstance(model, str):
            raise bad(f"model must be a string, got {model!r}", "model")
        if model != state.config.model_id:
            raise APIError(404, f"model {model!r} is not served here; GET /v1/models lists: {state.config.model_id}",
                           "model", "model_not_found")
    task = get("task") if get("task") is not None else "t2i"
    if not isinstance(task, str):
        raise bad(f"task must be a string, got {task!r}", "task")
    if task != "t2i":   # only text-to-image has this endpoint's inputs; others get theirs when built
        tasks.require(task, "task", status=400)
        raise bad(f"task {task} does not take a prompt and size on this endpoint", "task")
    prompt = get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise bad("prompt is required: a non-empty string", "prompt", "missing_prompt" if prompt is None else "invalid_value")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise bad(f"prompt must be at most {MAX_PROMPT_CHARS} characters, got {len(prompt)}", "prompt")
    n = 1 if get("n") is None else get("n")
    if not _is_int(n) or not 1 <= n <= MAX_N:
        raise bad(f"n must be an integer in 1..{MAX_N}, got {n!r}", "n")
    fmt = get("response_format")
    if fmt is not None and fmt != "b64_json":
        raise bad(f"response_format {fmt!r} is not supported: this server answers images inline only "
                  "(b64_json); it keeps no files to link to", "response_format", "unsupported_value")
    out = get("output_format")
    if out is not None and out != "png":
        raise bad(f"output_format {out!r} is not supported: images are PNG", "output_format", "unsupported_value")
    height, width = parse_size(get("size"), state.default_size, state.config.max_side)
    steps = 50 if get("num_inference_steps") is None else get("num_inference_steps")
    _limit(limits.check_steps, "num_inference_steps", "steps", steps)
    scale = 7.0 if get("guidance_scale") is None else get("guidance_scale")
    _limit(limits.check_scale, "guidance_scale", "scale", scale)
    seed = get("seed")
    if seed is None:                  # OpenAI's API has no seed: a fresh one, answered with the image
        seed = secrets.randbelow(2**32)
    if not _is_int(seed) or not 0 <= seed <= MAX_SEED - n:
        raise bad(f"seed must be an integer in [0, 2**64 - {n}] (image i uses seed + i, {n} image(s)), got {seed!r}",
                  "seed")
    key = tasks.BatchKey("t2i", height, width, steps, float(scale))
    return key, [prompt] * n, [seed + i for i in range(n)]


async def read_json(request: Request, limit: int = MAX_BODY) -> dict:
    # application/json only: a web page elsewhere cannot then send a request here from a visitor's
    # browser without the CORS preflight this server never grants (a form's text/plain could).
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/json":
        raise APIError(415, f"Content-Type must be application/json, got {ctype or 'none'!r} "
                            "(curl: -H 'Content-Type: application/json')", code="unsupported_media_type")
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise APIError(413, f"the request body is {length} bytes; this server accepts at most {limit}",
                       code="body_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"the request body is larger than {limit} bytes, the most this server accepts",
                           code="body_too_large")
        chunks.append(chunk)

    def no_constants(c):
        raise ValueError(f"{c} is not a JSON number")

    try:
        body = json.loads(b"".join(chunks), parse_constant=no_constants)
    except (ValueError, RecursionError) as e:
        raise bad(f"the request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object", code="invalid_json")
    return body


def png_b64(images) -> list[str]:
    out = []
    for img in images:
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        out.append(base64.b64encode(buf.getvalue()).decode("ascii"))
    return out


def endpoint_label(path: str) -> str:
    """The metrics label of a path: a route template, never the raw path (bounded cardinality)."""
    if path in ("/", "/health", "/metrics", "/v1/models", "/v1/images/generations", "/v1/images/variations",
                "/v1/images/captions"):
        return path
    for prefix, label in (("/v1/models/", "/v1/models/{id}"), ("/v1/requests/", "/v1/requests/{id}"),
                          ("/static/", "/static")):
        if path.startswith(prefix):
            return label
    return "other"


class Gate:
    """Pure ASGI middleware: the Bearer key (when set) on everything but the page and /health,
    and the request counter by endpoint and status."""

    def __init__(self, app, state: ServerState):
        self.app, self.state = app, state
        key = state.config.api_key
        self.key = None if key is None else key.encode()

    @staticmethod
    def loopback_host(scope) -> bool:
        """Without a key the server listens on loopback only; a Host header naming anything else
        is a DNS-rebinding page (or a proxy, which should pass Host 127.0.0.1 or use --api-key)."""
        host = ""
        for name, value in scope.get("headers", ()):
            if name == b"host":
                host = value.decode("latin-1").strip().lower()
                break
        if host.startswith("["):
            host = host[1:host.find("]")] if "]" in host else host
        else:
            host = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
        if host == "localhost" or host.endswith(".localhost"):
            return True
        try:
            return ipaddress.ip_address(host).is_loopback
        except ValueError:
            return False

    def authorized(self, scope) -> bool:
        got = b""
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                got = value
                break
        scheme, _, token = got.partition(b" ")
        # compare_digest on the token whatever the scheme, so the time taken says nothing of the key
        return hmac.compare_digest(token.strip(), self.key) and scheme.lower() == b"bearer"

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        status = [500]

        async def counted(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            if self.key is None and not self.loopback_host(scope):
                err = APIError(400, "the Host header must name this machine's loopback address (127.0.0.1, "
                                    "localhost or [::1]); behind a proxy, pass Host 127.0.0.1 or start with --api-key",
                               code="invalid_host")
                await JSONResponse(err.body(), 400)(scope, receive, counted)
            elif self.key is not None and path not in PUBLIC and not path.startswith("/static/") \
                    and not self.authorized(scope):
                err = APIError(401, "missing or wrong API key: send the header 'Authorization: Bearer KEY' "
                                    "(the server's --api-key)", code="invalid_api_key")
                await JSONResponse(err.body(), 401, headers={"WWW-Authenticate": "Bearer"})(scope, receive, counted)
            else:
                await self.app(scope, receive, counted)
        finally:
            self.state.metrics.requests.inc(endpoint_label(path), str(status[0]))


def error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), err.status, headers=err.headers)


def create_app(state: ServerState) -> FastAPI:
    # No /docs or /redoc: FastAPI's pages load their scripts from a CDN, and this server works offline.
    app = FastAPI(title="UniDiffuser", docs_url=None, redoc_url=None, openapi_url=None)
    cfg = state.config

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException):
        if exc.status_code == 404:
            msg = f"no such endpoint: {request.method} {request.url.path}"
        elif exc.status_code == 405:
            msg = f"{request.method} is not allowed on {request.url.path}"
        else:
            msg = str(exc.detail)
        return error_response(APIError(exc.status_code, msg, code="not_found" if exc.status_code == 404 else None,
                                       headers=getattr(exc, "headers", None)))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, exc: RequestValidationError):
        errs = exc.errors()
        first = errs[0] if errs else {}
        loc = [str(x) for x in first.get("loc", ()) if x not in ("body", "query", "path", "header")]
        msg = f"{'.'.join(loc) or 'request'}: {first.get('msg', 'invalid')}"
        return error_response(APIError(422, msg, loc[-1] if loc else None, "invalid_value"))

    @app.exception_handler(Exception)
    async def _unexpected(request, exc: Exception):
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return error_response(APIError(500, f"internal error: {type(exc).__name__}", code="internal_error"))

    @app.get("/health")
    async def health():
        if state.status != "ok":
            return JSONResponse({"status": state.status, "reason": state.reason}, 503)
        return {"status": "ok", "model": cfg.model_id, "default_size": state.default_size,
                "auth_required": cfg.api_key is not None, "max_n": MAX_N, "max_side": cfg.max_side,
                "queue_depth": state.batcher.queue_depth}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    def model_card() -> dict:
        return {"id": cfg.model_id, "object": "model", "created": state.created, "owned_by": "thu-ml",
                "tasks": sorted(tasks.TASKS), **state.model_info}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id}")
    async def model(model_id: str):
        if model_id != cfg.model_id:
            raise APIError(404, f"model {model_id!r} is not served here; GET /v1/models lists: {cfg.model_id}",
                           "model", "model_not_found")
        return model_card()

    @app.get("/v1/requests/{request_id}")
    async def progress(request_id: str = PathParam(pattern=REQUEST_ID.pattern)):
        job = state.jobs.get(request_id)
        if job is None:
            raise APIError(404, f"no request {request_id!r} in flight (finished, never sent, or not yet arrived)",
                           "request_id", "not_found")
        b = state.batcher
        return {"id": job.id, "object": "request.progress", "status": job.state, "n": job.n,
                "queue_position": b.position(job) if b else None,
                "steps_done": job.steps_done, "steps_total": job.steps_total or job.key.steps}

    @app.post("/v1/images/generations")
    async def generations(request: Request):
        t0 = time.monotonic()
        batcher = state.require_ready()
        rid = request.headers.get("x-request-id") or secrets.token_hex(12)
        if not REQUEST_ID.fullmatch(rid):
            raise bad("X-Request-Id must be 1-64 letters, digits, '.', '_' or '-'", "x-request-id")
        body = await read_json(request)
        key, prompts, seeds = parse_generation(body, state)
        if rid in state.jobs:        # checked and taken with no await between: one job per id
            raise bad(f"a request with X-Request-Id {rid!r} is already in flight", "x-request-id", "duplicate_request_id")
        job = Job(rid, key, prompts, seeds, deadline=time.monotonic() + cfg.request_timeout_s)
        state.jobs[rid] = job
        try:
            batcher.submit(job)
        except QueueFull as e:
            state.jobs.pop(rid, None)
            raise APIError(429, f"the queue is full ({cfg.max_queue} requests waiting, --max-queue); retry after "
                                f"{e.retry_after} s", code="queue_full", headers={"Retry-After": str(e.retry_after)})
        except APIError:
            state.jobs.pop(rid, None)
            raise
        try:
            outcome = await wait(request, job, state)
        finally:
            state.jobs.pop(rid, None)
        if outcome is None:          # the client went away
            return Response(status_code=499)
        if outcome.error is not None:
            raise outcome.error
        encoded = await asyncio.get_running_loop().run_in_executor(None, png_b64, outcome.outputs)
        state.metrics.images.inc("t2i", by=len(encoded))
        state.metrics.latency.observe(time.monotonic() - t0, "t2i")
        return JSONResponse({
            "created": int(time.time()),
            "data": [{"b64_json": b, "seed": s} for b, s in zip(encoded, seeds)],
            "model": cfg.model_id,
            "output_format": "png",
            "size": f"{key.width}x{key.height}",
            "settings": {"task": key.task, "seeds": seeds, "num_inference_steps": key.steps,
                         "guidance_scale": key.scale, "width": key.width, "height": key.height,
                         "batch_images": outcome.batch_images, "batch_requests": outcome.batch_requests,
                         "queue_s": round(outcome.queue_s, 4), "run_s": round(outcome.run_s, 4)},
        }, headers={"X-Request-Id": rid})

    # UniDiffuser's other tasks: their endpoints exist and say so (see tasks.py).
    @app.post("/v1/images/variations")
    async def variations():
        tasks.require("i2t2i")

    @app.post("/v1/images/captions")
    async def captions():
        tasks.require("i2t")

    @app.get("/")
    async def index():
        return FileResponse(STATIC / "index.html", headers={
            "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; object-src 'none'",
            "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return Gate(app, state)


async def wait(request: Request, job: Job, state: ServerState):
    """The job's outcome; None if the client went away first (a job still queued is then dropped
    and costs nothing). A job still queued at its deadline is answered 503."""
    waiter = asyncio.wrap_future(job.future)
    batcher = state.batcher
    while True:
        done, _ = await asyncio.wait({waiter}, timeout=0.2)
        if done:
            outcome = waiter.result()
            if outcome.error is not None and outcome.error.code == "timeout":
                state.metrics.dropped.inc("timeout")
            return outcome
        if job.state == "queued" and time.monotonic() >= job.deadline:
            batcher.cancel(job, APIError(503, "timed out waiting in the queue (--request-timeout-s); try again later",
                                         code="timeout"))
            continue
        if await request.is_disconnected():
            if batcher.cancel(job):
                state.metrics.dropped.inc("disconnected")
                log.info("request %s: the client went away before its batch started; dropped", job.id)
            return None
