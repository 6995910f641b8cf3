"""What every HTTP request passes before its route: the loopback Host of a server without a key,
the Origin of its POSTs, the Bearer key of a server with one; and the request counter, which
counts the gate's own refusals too."""
from __future__ import annotations

import hmac
import ipaddress

from fastapi.responses import JSONResponse

from .errors import APIError
from .state import ServerState

PUBLIC = ("/", "/health", "/favicon.ico")   # and /static/*: no key needed (they hold no data)


def endpoint_label(path: str) -> str:
    """The metrics label of a path: a route template, never the raw path (bounded cardinality)."""
    if path in ("/", "/health", "/metrics", "/v1/models", "/v1/images/generations", "/v1/images/variations",
                "/v1/images/captions", "/v1/generations"):
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

    @staticmethod
    def same_origin(scope) -> bool:
        """A POST without an Origin header (curl, the clients) or from this server's own page. A
        form on another site can send multipart/form-data without a CORS preflight; without a key
        nothing else would stop it from spending this server's GPU."""
        headers = dict(scope.get("headers", ()))
        origin = headers.get(b"origin")
        if origin is None:
            return True
        host = headers.get(b"host", b"").decode("latin-1").strip().lower()
        return origin.decode("latin-1").strip().lower() in (f"http://{host}", f"https://{host}")

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
            elif self.key is None and scope.get("method") == "POST" and not self.same_origin(scope):
                err = APIError(403, "a POST from another site's page (its Origin header is not this server's) is "
                                    "refused on a server without --api-key", code="cross_origin")
                await JSONResponse(err.body(), 403)(scope, receive, counted)
            elif self.key is not None and path not in PUBLIC and not path.startswith("/static/") \
                    and not self.authorized(scope):
                err = APIError(401, "missing or wrong API key: send the header 'Authorization: Bearer KEY' "
                                    "(the server's --api-key)", code="invalid_api_key")
                await JSONResponse(err.body(), 401, headers={"WWW-Authenticate": "Bearer"})(scope, receive, counted)
            else:
                await self.app(scope, receive, counted)
        finally:
            self.state.metrics.requests.inc(endpoint_label(path), str(status[0]))
