"""A JSON request read and checked: what each parameter may be and the message that says so (the
ranges and their wording are the CLI's, unidiffuser/limits.py, with the API's parameter names).
A request that passes is a batch key, one input per sample and each sample's seed."""
from __future__ import annotations

import json
import re
import secrets

from fastapi import Request

from .. import limits
from . import tasks
from .errors import APIError, bad
from .state import ServerState

MAX_N = 10                        # images per request, as OpenAI's Images API
MAX_PROMPT_CHARS = 4000           # as OpenAI's dall-e-3; CLIP reads the first 77 tokens anyway
MAX_BODY = 64 * 1024              # bytes of a JSON request body (a prompt and a few numbers)
MAX_SEED = 2**64                  # torch.Generator.manual_seed takes [0, 2**64)

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

# Where each task's requests go (the messages that send a client elsewhere, the page).
ENDPOINTS = {"t2i": "/v1/images/generations", "i2t": "/v1/images/captions", "i2t2i": "/v1/images/variations",
             "joint": "/v1/generations", "i": "/v1/generations", "t": "/v1/generations", "t2i2t": "/v1/generations"}


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


def check_body(request: Request, ctype_wanted: str, hint: str, limit: int, limit_hint: str = "") -> None:
    """The body's declared type and length, before any of it is read (415, 413)."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != ctype_wanted:
        raise APIError(415, f"Content-Type must be {ctype_wanted}, got {ctype or 'none'!r} ({hint})",
                       code="unsupported_media_type")
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise APIError(413, f"the request body is {length} bytes; this server accepts at most {limit}{limit_hint}",
                       code="body_too_large")


async def read_json(request: Request, limit: int = MAX_BODY) -> dict:
    # application/json only: a web page elsewhere cannot then send a request here from a visitor's
    # browser without the CORS preflight this server never grants (a form's text/plain could).
    check_body(request, "application/json", "curl: -H 'Content-Type: application/json'", limit)
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
