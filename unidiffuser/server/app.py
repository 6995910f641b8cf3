"""The HTTP side: an OpenAI-compatible Images API, UniDiffuser's other tasks, health, metrics,
progress and the web page.

    POST /v1/images/generations   text to image (OpenAI's request and response shape, + seed,
                                  num_inference_steps, guidance_scale; each image's seed)
    POST /v1/images/variations    image variation, i2t2i (OpenAI's multipart shape: image, n, size,
                                  response_format, + seed, num_inference_steps, guidance_scale)
    POST /v1/images/captions      captioning, i2t (multipart: image, n, size, seed, ...) -> texts
    POST /v1/generations          any task without an input image (JSON with "task": joint, i, t,
                                  t2i2t, t2i) -> images and/or texts per sample
    GET  /v1/requests/{id}        progress of a request in flight (queue position, steps done);
                                  the id is the request's X-Request-Id header (the client's or ours)
    GET  /v1/models[/{id}]        the one model served, with the tasks it runs
    GET  /health                  200 once the model is loaded and warm; 503 with the reason before
                                  and while draining
    GET  /metrics                 Prometheus text format
    GET  /                        the web page (static files under /static, served from here)

Nothing in a request names a server path: the model is loaded once at start, outputs are
answered inline (no files are written), an uploaded image is kept in memory (a large part passes
through a temporary file while the body is parsed), the page's files are fixed.
"""
from __future__ import annotations

import asyncio
import logging
import re
import secrets
import time
from pathlib import Path

from fastapi import FastAPI, Path as PathParam, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import tasks
from .batcher import Job, QueueFull
from .errors import APIError, bad
from .gate import Gate
from .parsing import CAPTION_FIELDS, ENDPOINTS, MAX_N, VARIATION_FIELDS, parse_generation, parse_task_request, read_json
from .responses import encode_samples, error_response, output_body
from .state import ServerState
from .uploads import parse_upload

log = logging.getLogger("unidiffuser.server")

STATIC = Path(__file__).resolve().parent / "static"
REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


def create_app(state: ServerState) -> FastAPI:
    # No /docs or /redoc: FastAPI's pages load their scripts from a CDN, and this server works offline.
    app = FastAPI(title="UniDiffuser", docs_url=None, redoc_url=None, openapi_url=None)
    add_error_handlers(app)
    add_status_routes(app, state)
    add_model_routes(app, state)
    add_task_routes(app, state)
    add_page(app)
    return Gate(app, state)


def add_error_handlers(app: FastAPI) -> None:
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


def add_status_routes(app: FastAPI, state: ServerState) -> None:
    """/health, /metrics and the progress of a request in flight."""
    cfg = state.config

    @app.get("/health")
    async def health():
        if state.status != "ok":
            return JSONResponse({"status": state.status, "reason": state.reason}, 503)
        return {"status": "ok", "model": cfg.model_id, "default_size": state.default_size,
                "auth_required": cfg.api_key is not None, "max_n": MAX_N, "max_side": cfg.max_side,
                "max_upload_bytes": cfg.max_upload, "tasks": {t: ENDPOINTS[t] for t in state.tasks},
                "queue_depth": state.batcher.queue_depth}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/requests/{request_id}")
    async def progress(request_id: str = PathParam(pattern=REQUEST_ID.pattern)):
        job = state.jobs.get(request_id)
        if job is None:
            raise APIError(404, f"no request {request_id!r} in flight (finished, never sent, or not yet arrived)",
                           "request_id", "not_found")
        b = state.batcher
        return {"id": job.id, "object": "request.progress", "status": job.state, "n": job.n,
                "queue_position": b.position(job) if b else None,
                "steps_done": job.steps_done, "steps_total": job.steps_total or job.key.steps * state.tasks[job.key.task].solver_runs}


def add_model_routes(app: FastAPI, state: ServerState) -> None:
    cfg = state.config

    def model_card() -> dict:
        return {"id": cfg.model_id, "object": "model", "created": state.created, "owned_by": "thu-ml",
                "tasks": list(state.tasks), **state.model_info}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id}")
    async def model(model_id: str):
        if model_id != cfg.model_id:
            raise APIError(404, f"model {model_id!r} is not served here; GET /v1/models lists: {cfg.model_id}",
                           "model", "model_not_found")
        return model_card()


def add_task_routes(app: FastAPI, state: ServerState) -> None:
    """One route per endpoint of the tasks; each checks its request, then `run` queues it."""

    @app.post("/v1/images/generations")
    async def generations(request: Request):
        """Text to image, OpenAI's shape."""
        t0 = time.monotonic()
        state.require_ready()
        rid = take_request_id(request)
        key, prompts, seeds = parse_generation(await read_json(request), state)
        return await run(request, state, rid, key, prompts, seeds, t0)

    @app.post("/v1/generations")
    async def task_generations(request: Request):
        """Any task without an input image: joint, i, t, t2i2t (and t2i)."""
        t0 = time.monotonic()
        state.require_ready()
        rid = take_request_id(request)
        key, inputs, seeds = parse_task_request(await read_json(request), state)
        return await run(request, state, rid, key, inputs, seeds, t0, top={"task": key.task})

    async def image_task(request: Request, name: str, allowed: tuple[str, ...]) -> Response:
        t0 = time.monotonic()
        state.require_ready()
        task = state.task(name)
        rid = take_request_id(request)
        key, inputs, seeds, record = await parse_upload(request, state, task, allowed)
        return await run(request, state, rid, key, inputs, seeds, t0, extra={"image": record})

    @app.post("/v1/images/variations")
    async def variations(request: Request):
        """Image variation (i2t2i), OpenAI's multipart shape."""
        return await image_task(request, "i2t2i", VARIATION_FIELDS)

    @app.post("/v1/images/captions")
    async def captions(request: Request):
        """Captioning (i2t): multipart like variations; texts."""
        return await image_task(request, "i2t", CAPTION_FIELDS)


def add_page(app: FastAPI) -> None:
    @app.get("/")
    async def index():
        return FileResponse(STATIC / "index.html", headers={
            "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; object-src 'none'",
            "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")


def take_request_id(request: Request) -> str:
    rid = request.headers.get("x-request-id") or secrets.token_hex(12)
    if not REQUEST_ID.fullmatch(rid):
        raise bad("X-Request-Id must be 1-64 letters, digits, '.', '_' or '-'", "x-request-id")
    return rid


async def run(request: Request, state: ServerState, rid: str, key: tasks.BatchKey, inputs: list, seeds: list[int],
              t0: float, extra: dict | None = None, top: dict | None = None) -> Response:
    """Queue one request's samples, wait for its batch, answer its own outputs."""
    cfg = state.config
    batcher = state.require_ready()
    if rid in state.jobs:        # checked and taken with no await between: one job per id
        raise bad(f"a request with X-Request-Id {rid!r} is already in flight", "x-request-id", "duplicate_request_id")
    job = Job(rid, key, inputs, seeds, deadline=time.monotonic() + cfg.request_timeout_s)
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
    items = await asyncio.get_running_loop().run_in_executor(None, encode_samples, outcome.outputs, seeds)
    task = state.tasks[key.task]
    n_images = sum("b64_json" in d for d in items)
    if n_images:
        state.metrics.images.inc(key.task, by=n_images)
    if "text" in task.outputs:
        state.metrics.texts.inc(key.task, by=len(items))
    state.metrics.latency.observe(time.monotonic() - t0, key.task)
    body = output_body(items, outcome, task, key, seeds, cfg.model_id, extra, top)
    return JSONResponse(body, headers={"X-Request-Id": rid})


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
