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
import base64
import concurrent.futures
import io
import json
import logging
import re
import secrets
import time
from pathlib import Path

from fastapi import FastAPI, Path as PathParam, Request
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import limits
from ..images import InputImage, read_image_bytes
from . import tasks
from .batcher import Job, QueueFull
from .errors import APIError, bad
from .gate import Gate
from .state import ServerState

log = logging.getLogger("unidiffuser.server")

STATIC = Path(__file__).resolve().parent / "static"
MAX_N = 10                        # images per request, as OpenAI's Images API
MAX_PROMPT_CHARS = 4000           # as OpenAI's dall-e-3; CLIP reads the first 77 tokens anyway
MAX_BODY = 64 * 1024              # bytes of a JSON request body (a prompt and a few numbers)
MAX_SEED = 2**64                  # torch.Generator.manual_seed takes [0, 2**64)
REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")

# OpenAI's Images API parameters this server has no equivalent for: refused with a 400 naming
# them rather than silently ignored (the official client sends none of them unless asked).
UNSUPPORTED = ("quality", "style", "user", "background", "moderation", "output_compression", "partial_images",
               "stream", "safety_identifier", "input_fidelity", "svg", "complexity", "frame_count",
               "frame_duration_ms")
SETTINGS = ("model", "n", "size", "seed", "num_inference_steps", "guidance_scale")
GENERATION_FIELDS = (*SETTINGS, "prompt", "response_format", "output_format", "task")   # /v1/images/generations
TASK_FIELDS = ("task", *SETTINGS, "prompt", "response_format", "output_format")         # /v1/generations
VARIATION_FIELDS = ("image", *SETTINGS, "response_format", "output_format")            # /v1/images/variations
CAPTION_FIELDS = ("image", *SETTINGS)                                                  # /v1/images/captions
DEFAULT_SCALE = 7.0               # also the batch key's scale of a task without guidance (i, t)
MAX_FORM_FIELD = 64 * 1024        # bytes of one non-file field of a multipart body

# Where each task's requests go (the messages that send a client elsewhere, the page).
ENDPOINTS = {"t2i": "/v1/images/generations", "i2t": "/v1/images/captions", "i2t2i": "/v1/images/variations",
             "joint": "/v1/generations", "i": "/v1/generations", "t": "/v1/generations", "t2i2t": "/v1/generations"}
# One thread decodes uploads, off the event loop: a 16 MiB PNG can take a second and hold
# hundreds of MB while decoding, and one at a time bounds both.
DECODER = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="unidiffuser-decode")


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


def check_fields(body: dict, allowed: tuple[str, ...], endpoint: str) -> None:
    """OpenAI parameters we have no equivalent for and unknown ones: 400 naming them."""
    for k, v in body.items():
        if k in UNSUPPORTED:
            if v is not None:
                raise bad(f"{k} is not supported by this server (UniDiffuser has no such setting); leave it out",
                          k, "unsupported_parameter")
        elif k not in allowed:
            raise bad(f"unknown parameter {k!r}; {endpoint} takes {', '.join(allowed)}", k, "unknown_parameter")


def check_model(model, state: ServerState) -> None:
    if model is None:
        return
    if not isinstance(model, str):
        raise bad(f"model must be a string, got {model!r}", "model")
    if model != state.config.model_id:
        raise APIError(404, f"model {model!r} is not served here; GET /v1/models lists: {state.config.model_id}",
                       "model", "model_not_found")


def parse_prompt(prompt) -> str:
    if not isinstance(prompt, str) or not prompt.strip():
        raise bad("prompt is required: a non-empty string", "prompt", "missing_prompt" if prompt is None else "invalid_value")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise bad(f"prompt must be at most {MAX_PROMPT_CHARS} characters, got {len(prompt)}", "prompt")
    return prompt


def check_formats(get) -> None:
    fmt = get("response_format")
    if fmt is not None and fmt != "b64_json":
        raise bad(f"response_format {fmt!r} is not supported: this server answers images inline only "
                  "(b64_json); it keeps no files to link to", "response_format", "unsupported_value")
    out = get("output_format")
    if out is not None and out != "png":
        raise bad(f"output_format {out!r} is not supported: images are PNG", "output_format", "unsupported_value")


def parse_settings(get, state: ServerState, task: tasks.Task) -> tuple[tasks.BatchKey, list[int]]:
    """n, size, steps, scale and seed: the batch key and each sample's seed (sample i: seed + i)."""
    n = 1 if get("n") is None else get("n")
    if not _is_int(n) or not 1 <= n <= MAX_N:
        raise bad(f"n must be an integer in 1..{MAX_N}, got {n!r}", "n")
    height, width = parse_size(get("size"), state.default_size, state.config.max_side)
    steps = 50 if get("num_inference_steps") is None else get("num_inference_steps")
    _limit(limits.check_steps, "num_inference_steps", "steps", steps)
    scale = DEFAULT_SCALE if get("guidance_scale") is None else get("guidance_scale")
    _limit(limits.check_scale, "guidance_scale", "scale", scale)
    seed = get("seed")
    if seed is None:                  # OpenAI's API has no seed: a fresh one, answered with the outputs
        seed = secrets.randbelow(2**32)
    if not _is_int(seed) or not 0 <= seed <= MAX_SEED - n:
        raise bad(f"seed must be an integer in [0, 2**64 - {n}] (sample i uses seed + i, {n} sample(s)), got {seed!r}",
                  "seed")
    # A task without guidance (i, t) ignores the scale: one key for all its requests, so they merge.
    key = tasks.BatchKey(task.name, height, width, steps, float(scale) if task.guided else DEFAULT_SCALE)
    return key, [seed + i for i in range(n)]


def wrong_endpoint(name: str, here: str) -> APIError:
    there = ENDPOINTS[name]
    how = f'POST {there} with "task": "{name}"' if there == "/v1/generations" else f"POST {there}" + (
        " (multipart/form-data with the image file)" if tasks.TASKS[name].input == "image" else "")
    return bad(f"task {name} ({tasks.KNOWN[name]}) is not run by {here}: {how}", "task", "wrong_endpoint")


def parse_generation(body: dict, state: ServerState) -> tuple[tasks.BatchKey, list[str], list[int]]:
    """POST /v1/images/generations: text to image."""
    check_fields(body, GENERATION_FIELDS, "this endpoint")
    get = body.get
    check_model(get("model"), state)
    name = get("task") if get("task") is not None else "t2i"
    if not isinstance(name, str):
        raise bad(f"task must be a string, got {name!r}", "task")
    if name != "t2i":
        state.task(name, "task", status=400)      # not a task, or not on this server
        raise wrong_endpoint(name, "/v1/images/generations")
    task = state.task("t2i")
    prompt = parse_prompt(get("prompt"))
    check_formats(get)
    key, seeds = parse_settings(get, state, task)
    return key, [prompt] * len(seeds), seeds


def parse_task_request(body: dict, state: ServerState) -> tuple[tasks.BatchKey, list, list[int]]:
    """POST /v1/generations: a task whose input is a prompt or nothing."""
    check_fields(body, TASK_FIELDS, "this endpoint")
    get = body.get
    name = get("task")
    if name is None:
        here = [t for t in state.tasks if tasks.TASKS[t].input != "image"]
        raise bad(f"task is required: one of {', '.join(here)}", "task", "missing_task")
    if not isinstance(name, str):
        raise bad(f"task must be a string, got {name!r}", "task")
    task = state.task(name, "task", status=400)
    if task.input == "image":
        raise wrong_endpoint(name, "/v1/generations")
    check_model(get("model"), state)
    if task.input == "prompt":
        prompt = parse_prompt(get("prompt"))
    elif get("prompt") is not None:
        raise bad(f"task {name} ({tasks.KNOWN[name]}) takes no prompt; leave it out", "prompt")
    check_formats(get)
    key, seeds = parse_settings(get, state, task)
    return key, [prompt if task.input == "prompt" else None] * len(seeds), seeds


INT_FIELDS, FLOAT_FIELDS = ("n", "seed", "num_inference_steps"), ("guidance_scale",)


def typed_form(fields: dict[str, str]) -> dict:
    """A multipart form's text fields with the numbers as numbers (a field that does not parse
    stays a string, and its check says what it must be)."""
    out = {}
    for k, v in fields.items():
        text = v.strip()
        if k in INT_FIELDS and re.fullmatch(r"[+-]?\d{1,30}", text):
            v = int(text)
        elif k in FLOAT_FIELDS and re.fullmatch(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?|[+-]?(inf|infinity|nan)",
                                                text, re.IGNORECASE):
            v = float(text)           # inf and nan are refused by the scale's check
        out[k] = v
    return out


async def read_form(request: Request, limit: int) -> tuple[dict[str, str], dict[str, tuple[str, bytes]]]:
    """A multipart/form-data body, at most `limit` bytes: its text fields and its files
    ({field: (filename, bytes)}), each field given once."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "multipart/form-data":
        raise APIError(415, f"Content-Type must be multipart/form-data with the image file, got {ctype or 'none'!r} "
                            "(curl: -F image=@photo.png)", code="unsupported_media_type")
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise APIError(413, f"the request body is {length} bytes; this server accepts at most {limit} "
                            "(--max-upload-mib)", code="body_too_large")

    async def bounded():
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise APIError(413, f"the request body is larger than {limit} bytes, the most this server accepts "
                                    "(--max-upload-mib)", code="body_too_large")
            yield chunk

    parser = MultiPartParser(request.headers, bounded(), max_files=2, max_fields=16, max_part_size=MAX_FORM_FIELD)
    try:
        form = await parser.parse()
    except MultiPartException as e:
        raise bad(f"the request body is not valid multipart/form-data: {e.message}", code="invalid_multipart") from None
    fields: dict[str, str] = {}
    files: dict[str, tuple[str, bytes]] = {}
    try:
        for k, v in form.multi_items():
            if k in fields or k in files:
                raise bad(f"{k} is given more than once; give it once", k)
            if isinstance(v, UploadFile):
                files[k] = (v.filename or "", await v.read())
            else:
                fields[k] = v
    finally:
        await form.close()
    return fields, files


def upload_name(filename: str) -> str:
    """The client's file name, as the messages quote it (bounded, printable)."""
    name = "".join(c if c.isprintable() else "?" for c in Path(filename.replace("\\", "/")).name)[:100]
    return name or "upload"


def centre_square(inp: InputImage) -> InputImage:
    """Only the centred square of side min(w, h) is ever read (images.center_crop), so a queued
    request keeps that alone: cropping is exact (the pipeline's crop of the square is the square)."""
    w, h = inp.image.size
    side = min(w, h)
    top, left = (h - side) // 2, (w - side) // 2
    return InputImage(inp.image.crop((left, top, left + side, top + side)), inp.name, inp.sha256)


async def parse_upload(request: Request, state: ServerState, task: tasks.Task, allowed: tuple[str, ...]):
    """A multipart request of an image task: (key, inputs, seeds, the image's record)."""
    fields, files = await read_form(request, state.config.max_upload)
    for k in files:
        if k != "image":
            raise bad(f"unknown file {k!r}; this endpoint takes one file, image", k, "unknown_parameter")
    if "image" in fields:
        raise bad("image must be a file part (curl: -F image=@photo.png), not a text field", "image")
    body = typed_form(fields)
    check_fields(body, tuple(a for a in allowed if a != "image"), "this endpoint")
    get = body.get
    check_model(get("model"), state)
    check_formats(get)
    key, seeds = parse_settings(get, state, task)
    if "image" not in files:
        raise bad("image is required: the image file to read (PNG, JPEG, WebP, GIF, ...)", "image", "missing_image")
    filename, data = files["image"]
    name = upload_name(filename)
    if not data:
        raise bad(f"image {name}: the file is empty", "image")
    try:        # the CLI's checks and conversion (unidiffuser/images.py), in the decoding thread
        inp = await asyncio.get_running_loop().run_in_executor(DECODER, read_image_bytes, data, name, "image")
    except limits.InputError as e:
        raise bad(e.render(), "image", "invalid_image") from None
    record = {"name": inp.name, "sha256": inp.sha256, "size": list(inp.image.size)}
    inp = centre_square(inp)
    return key, [inp] * len(seeds), seeds, record


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


def encode_samples(samples: list[tasks.Sample], seeds: list[int]) -> list[dict]:
    """Each sample as a response item: its PNG (b64_json) and/or its text, and its seed."""
    items = []
    for sample, seed in zip(samples, seeds):
        item = {}
        if sample.image is not None:
            item["b64_json"] = png_b64([sample.image])[0]
        if sample.text is not None:
            item["text"] = sample.text
        item["seed"] = seed
        items.append(item)
    return items


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
                "max_upload_bytes": cfg.max_upload, "tasks": {t: ENDPOINTS[t] for t in state.tasks},
                "queue_depth": state.batcher.queue_depth}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

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

    def take_request_id(request: Request) -> str:
        rid = request.headers.get("x-request-id") or secrets.token_hex(12)
        if not REQUEST_ID.fullmatch(rid):
            raise bad("X-Request-Id must be 1-64 letters, digits, '.', '_' or '-'", "x-request-id")
        return rid

    async def run(request: Request, rid: str, key: tasks.BatchKey, inputs: list, seeds: list[int], t0: float,
                  extra: dict | None = None, top: dict | None = None) -> Response:
        """Queue one request's samples, wait for its batch, answer its own outputs."""
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
        body = {"created": int(time.time()), **(top or {}), "data": items, "model": cfg.model_id}
        if "image" in task.outputs:
            body.update({"output_format": "png", "size": f"{key.width}x{key.height}"})
        body["settings"] = {
            "task": key.task, "seeds": seeds, "num_inference_steps": key.steps,
            "guidance_scale": key.scale if task.guided else None, "width": key.width, "height": key.height,
            **(extra or {}), "batch_images": outcome.batch_images, "batch_requests": outcome.batch_requests,
            "queue_s": round(outcome.queue_s, 4), "run_s": round(outcome.run_s, 4)}
        return JSONResponse(body, headers={"X-Request-Id": rid})

    @app.post("/v1/images/generations")
    async def generations(request: Request):
        """Text to image, OpenAI's shape."""
        t0 = time.monotonic()
        state.require_ready()
        rid = take_request_id(request)
        key, prompts, seeds = parse_generation(await read_json(request), state)
        return await run(request, rid, key, prompts, seeds, t0)

    @app.post("/v1/generations")
    async def task_generations(request: Request):
        """Any task without an input image: joint, i, t, t2i2t (and t2i)."""
        t0 = time.monotonic()
        state.require_ready()
        rid = take_request_id(request)
        key, inputs, seeds = parse_task_request(await read_json(request), state)
        return await run(request, rid, key, inputs, seeds, t0, top={"task": key.task})

    async def image_task(request: Request, name: str, allowed: tuple[str, ...]) -> Response:
        t0 = time.monotonic()
        state.require_ready()
        task = state.task(name)
        rid = take_request_id(request)
        key, inputs, seeds, record = await parse_upload(request, state, task, allowed)
        return await run(request, rid, key, inputs, seeds, t0, extra={"image": record})

    @app.post("/v1/images/variations")
    async def variations(request: Request):
        """Image variation (i2t2i), OpenAI's multipart shape."""
        return await image_task(request, "i2t2i", VARIATION_FIELDS)

    @app.post("/v1/images/captions")
    async def captions(request: Request):
        """Captioning (i2t): multipart like variations; texts."""
        return await image_task(request, "i2t", CAPTION_FIELDS)

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
