"""Errors as the OpenAI API writes them: {"error": {"message", "type", "param", "code"}}.

Every error the server answers has this shape (FastAPI's own validation and routing errors are
converted to it too), so the official clients raise their usual exceptions with our message.

    status  type                    when
    400     invalid_request_error   a parameter is wrong (param names it; a bad upload: "image"), the
                                    body is not JSON (or not multipart), a Host header that is not
                                    loopback (no --api-key: DNS rebinding)
    401     authentication_error    --api-key is set and the Bearer token is missing or wrong
    403     permission_error        without --api-key: a POST whose Origin is another site's page
    404     not_found_error         no such route, model or request id; a task this server does not run
    413     invalid_request_error   the request body is larger than the server accepts
    415     invalid_request_error   a POST body of the wrong Content-Type (application/json, or
                                    multipart/form-data for the endpoints that take an image)
    422     invalid_request_error   FastAPI's own validation of a path or query parameter
    429     rate_limit_error        the queue is full (Retry-After says when to try again)
    500     server_error            the model failed on a batch (the server stays up)
    503     service_unavailable     loading, warming up, draining (SIGTERM), or waited past the timeout
"""
from __future__ import annotations

from typing import Any

TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "not_found_error",
         405: "invalid_request_error", 413: "invalid_request_error", 415: "invalid_request_error", 422: "invalid_request_error",
         429: "rate_limit_error", 500: "server_error", 503: "service_unavailable"}


class APIError(Exception):
    """An answer that is an error: status, OpenAI error object, extra headers (Retry-After)."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = dict(headers or {})

    @property
    def type(self) -> str:
        return TYPES.get(self.status, "server_error" if self.status >= 500 else "invalid_request_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None, code: str = "invalid_value") -> APIError:
    """400 naming the parameter."""
    return APIError(400, message, param, code)

