"""What a request is answered: its samples as response items (an image as base64 PNG, a text as
text, each with its seed), the body around them, and an APIError as OpenAI's error object."""
from __future__ import annotations

import base64
import time

from fastapi.responses import JSONResponse

from .. import png
from . import tasks
from .batcher import Outcome
from .errors import APIError


def png_b64(images) -> list[str]:
    return [base64.b64encode(png.encode(img)).decode("ascii") for img in images]


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


def output_body(items: list[dict], outcome: Outcome, task: tasks.Task, key: tasks.BatchKey, seeds: list[int],
                model_id: str, extra: dict | None = None, top: dict | None = None) -> dict:
    """OpenAI's fields (created, data; output_format and size where the task makes images), the
    route's own (`top`), and in settings what the request ran with and the batch it shared."""
    body = {"created": int(time.time()), **(top or {}), "data": items, "model": model_id}
    if "image" in task.outputs:
        body.update({"output_format": "png", "size": f"{key.width}x{key.height}"})
    body["settings"] = {
        "task": key.task, "seeds": seeds, "num_inference_steps": key.steps,
        "guidance_scale": key.scale if task.guided else None, "width": key.width, "height": key.height,
        **(extra or {}), "batch_images": outcome.batch_images, "batch_requests": outcome.batch_requests,
        "queue_s": round(outcome.queue_s, 4), "run_s": round(outcome.run_s, 4)}
    return body


def error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), err.status, headers=err.headers)
