"""A multipart request of an image task (variations, captions): the body read within its bound,
its text fields typed as JSON's would be, the image through the CLI's checks and conversion
(unidiffuser/images.py)."""
from __future__ import annotations

import asyncio
import concurrent.futures
import re
from pathlib import Path

from fastapi import Request
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from .. import limits
from ..images import InputImage, read_image_bytes
from . import tasks
from .errors import APIError, bad
from .parsing import check_body, check_fields, check_formats, check_model, parse_settings
from .state import ServerState

MAX_FORM_FIELD = 64 * 1024        # bytes of one non-file field of a multipart body

# One thread decodes uploads, off the event loop: a 16 MiB PNG can take a second and hold
# hundreds of MB while decoding, and one at a time bounds both.
DECODER = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="unidiffuser-decode")

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
    check_body(request, "multipart/form-data", "with the image file; curl: -F image=@photo.png", limit,
               " (--max-upload-mib)")

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
