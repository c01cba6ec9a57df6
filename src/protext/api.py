"""The HTTP layer of `protext serve`: a FastAPI app over a `serve.Service`, under uvicorn.

Endpoints: `POST /v1/classify`, `GET /v1/label-sets`, `GET /healthz` (liveness: the process
answers), `GET /readyz` (readiness: a request sent now would be served), `GET /metrics`
(Prometheus), the OpenAPI schema at `/openapi.json` and the web page at `/`, which uses only
the JSON API. Every error is JSON, `{"error": "what was wrong"}`.

What keeps one client from taking the server, outermost first:

- `Guard` (uvicorn's HTTP protocol, extended): connections per client address and in all;
  headers must arrive within `header_timeout_s`, or the connection gets 408 and is closed;
- `Gate`: the Host header must name this server (a DNS-rebinding page cannot reach it under
  another name), a browser's Origin must be this server's own (another site's page cannot make
  a visitor's browser post to it), and with an API key every `/v1/` and `/metrics` request must
  carry it (`Authorization: Bearer KEY` or `X-API-Key: KEY`, compared in constant time);
- `BodyLimits`: classify requests in flight, each body's size (refused before it is read when
  it has a length, counted as it arrives when chunked), the bytes of all bodies held at once,
  and the time a body may take;
- the classify endpoint: a deadline (`request_timeout_s`, then 504), and the client's
  disconnect cancels its work;
- `run`: SIGTERM or Ctrl-C drains the requests in flight for at most `drain_timeout_s` and
  exits with status 0; a second signal stops at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import signal
import threading
import time
from collections import Counter
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib.resources import files
from typing import Any, Iterator

from . import __version__
from .errors import ProtextError
from .serve import ApiError, Limits, Service, release_memory

try:
    import uvicorn
    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, JSONResponse, Response
    from pydantic import BaseModel
    from starlette.datastructures import UploadFile
    from starlette.exceptions import HTTPException
    from starlette.formparsers import MultiPartException
    from starlette.types import ASGIApp, Message, Receive, Scope, Send
    from uvicorn.protocols.http.h11_impl import H11Protocol
except ImportError as e:  # an optional extra: say how to get it instead of a bare ImportError
    raise ProtextError(f"protext serve needs fastapi, uvicorn, python-multipart and prometheus-client ({e}); "
                       f"install them with: pip install -e '.[serve]' (protext's 'serve' extra)") from e

log = logging.getLogger("protext.serve")
LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass(frozen=True)
class Access:
    """Who may use the server: an API key (None: no key) and the host names requests may address
    (None: this machine's loopback names when bound to loopback, else any)."""

    api_key: str | None = None
    allowed_hosts: tuple[str, ...] | None = None

    def hosts(self, bind: str) -> tuple[str, ...] | None:
        if self.allowed_hosts is not None:
            return tuple(h.lower() for h in self.allowed_hosts)
        return LOOPBACK if bind in LOOPBACK else None


class Prob(BaseModel):
    label: str
    prob: float


class Reason(BaseModel):
    text: str
    score: float


class ImageResult(BaseModel):
    image: str
    top: list[Prob]
    explain: list[Reason] | None = None


class Classified(BaseModel):
    head: str
    label_set: str | None
    labels: int
    activation: str
    results: list[ImageResult]


class LabelSet(BaseModel):
    name: str
    size: int
    labels: list[str]


class LabelSets(BaseModel):
    label_sets: list[LabelSet]
    default_label_set: str | None
    heads: list[str]
    default_head: str
    explains: list[str]
    top_k: int
    backbone: str
    precision: str = "fp32"  # the image tower's arithmetic (serve --precision)
    prompts: bool


class ErrorBody(BaseModel):
    error: str


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _raw_error(status: int, reason: str, message: str) -> bytes:
    """A whole HTTP/1.1 error response, for the connection layer (before any app runs)."""
    body = json.dumps({"error": message}).encode()
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            f"connection: close\r\nretry-after: 1\r\n\r\n").encode() + body


def guard(limits: Limits) -> type:
    """uvicorn's HTTP/1.1 protocol with connection caps and a header deadline (uvicorn has neither)."""
    open_by_client: Counter[str] = Counter()

    class Guard(H11Protocol):
        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._address = self.client[0] if self.client else "?"
            self._counted, self._timer = False, None
            total = sum(open_by_client.values())
            if open_by_client[self._address] >= limits.max_connections_per_client or total >= limits.max_connections:
                which = ("from your address (--max-connections-per-client)"
                         if open_by_client[self._address] >= limits.max_connections_per_client
                         else "in all (--max-connections)")
                transport.write(_raw_error(503, "Service Unavailable", f"too many open connections {which}"))
                transport.close()
                return
            open_by_client[self._address] += 1
            self._counted = True
            self._arm()

        def _arm(self) -> None:
            self._timer = self.loop.call_later(limits.header_timeout_s, self._headers_too_slow)

        def _headers_too_slow(self) -> None:
            if self.cycle is None or self.cycle.response_complete:  # no request under way: headers did not come
                self.transport.write(_raw_error(408, "Request Timeout",
                                                f"request headers not received within {limits.header_timeout_s:g} "
                                                f"s (--header-timeout-s)"))
                self.transport.close()

        def handle_events(self) -> None:
            super().handle_events()
            if self._timer is not None and self.cycle is not None and not self.cycle.response_complete:
                self._timer.cancel()  # the headers are in
                self._timer = None

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if self._counted and self._timer is None and not self.transport.is_closing():
                self._arm()  # the next request on this connection has the same deadline

        def connection_lost(self, exc: Exception | None) -> None:
            if self._counted:
                open_by_client[self._address] -= 1
                if not open_by_client[self._address]:
                    del open_by_client[self._address]
                self._counted = False
            if self._timer is not None:
                self._timer.cancel()
            super().connection_lost(exc)

    return Guard


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None


class Gate:
    """ASGI middleware: the Host and Origin checks and the API key (see the module's docstring)."""

    def __init__(self, app: ASGIApp, access: Access, bind: str):
        self.app, self.access, self.hosts = app, access, access.hosts(bind)
        self.key = access.api_key.encode() if access.api_key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        host = (_header(scope, b"host") or "").lower()
        name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        name = name.strip("[]")
        refusal = None
        if self.hosts is not None and name not in self.hosts:
            refusal = _error(421, f"this server does not answer to the host name {name or '(none)'!r}; "
                                  f"start it with --allowed-hosts to add one")
        origin = _header(scope, b"origin")
        if refusal is None and origin is not None and origin != "null":
            own = {f"{scope.get('scheme', 'http')}://{host}"}
            if origin.lower() not in own:
                refusal = _error(403, f"cross-site request refused: a page from {origin} may not use this server")
        if refusal is None and origin == "null" and scope["method"] == "POST":
            refusal = _error(403, "cross-site request refused: a page of unknown origin may not use this server")
        if refusal is None and self.key is not None and (scope["path"].startswith("/v1/") or scope["path"] == "/metrics"):
            given = _header(scope, b"x-api-key") or ""
            bearer = _header(scope, b"authorization") or ""
            if bearer.lower().startswith("bearer "):
                given = bearer[7:].strip()
            if not hmac.compare_digest(given.encode(), self.key):
                refusal = _error(401, "an API key is needed: send 'Authorization: Bearer KEY' or 'X-API-Key: KEY'",
                                 {"WWW-Authenticate": "Bearer"})
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        await self.app(scope, receive, send)


class BodyTooLarge(Exception):
    pass


class BodyLimits:
    """ASGI middleware for POST bodies: requests in flight, each body's size, all bodies' bytes at
    once, and the time a body may take. A body is counted as it arrives, never buffered here."""

    def __init__(self, app: ASGIApp, limits: Limits):
        self.app, self.limits = app, limits
        self.in_flight, self.held = 0, 0

    def too_large(self) -> str:
        return (f"request body over the limit of {self.limits.max_upload_mb:g} MiB (--max-upload-mb); send fewer or "
                f"smaller images per request")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        lim = self.limits
        length = _header(scope, b"content-length")
        if self.in_flight >= lim.max_requests:
            refusal = _error(503, f"server busy: {self.in_flight} requests in flight (--max-requests); retry shortly",
                             {"Retry-After": "1"})
        elif length is not None and not length.isdigit():
            refusal = _error(400, "malformed Content-Length header")
        elif length is not None and int(length) > lim.max_upload_bytes:
            refusal = _error(413, self.too_large())
        elif self.held + (int(length) if length else 0) > lim.max_inflight_bytes:
            refusal = _error(503, f"server busy: {self.held / 2**20:.0f} MiB of request bodies are being received "
                                  f"(--max-inflight-mb {lim.max_inflight_mb:g}); retry shortly", {"Retry-After": "1"})
        else:
            await self._serve(scope, receive, send, int(length) if length else None)
            return
        await refusal(scope, receive, send)

    async def _serve(self, scope: Scope, receive: Receive, send: Send, length: int | None) -> None:
        lim, loop = self.limits, asyncio.get_running_loop()
        deadline = loop.time() + lim.body_timeout_s
        state = {"got": 0, "reserved": length or 0, "started": False, "complete": False}
        self.in_flight += 1
        self.held += state["reserved"]

        async def counted() -> Message:
            if state["complete"]:
                return await receive()  # after the body: wait for a disconnect
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                raise BodyTimeout() from None
            if message["type"] == "http.request":
                state["got"] += len(message.get("body", b""))
                if state["got"] > lim.max_upload_bytes:
                    raise BodyTooLarge()
                if state["got"] > state["reserved"]:  # a chunked body: held bytes grow as it arrives
                    self.held += state["got"] - state["reserved"]
                    state["reserved"] = state["got"]
                    if self.held > lim.max_inflight_bytes:
                        raise BodyTooLarge()
                state["complete"] = not message.get("more_body", False)
            return message

        async def watched(message: Message) -> None:
            if message["type"] == "http.response.start":
                state["started"] = True
            await send(message)

        try:
            await self.app(scope, counted, watched)
        except BodyTooLarge:
            if not state["started"]:
                over = state["got"] > lim.max_upload_bytes
                await (_error(413, self.too_large()) if over else _error(
                    503, f"server busy: request bodies together over --max-inflight-mb {lim.max_inflight_mb:g}; "
                         f"retry shortly", {"Retry-After": "1"}))(scope, receive, send)
        except BodyTimeout:
            if not state["started"]:
                await _error(408, f"request body not received within {lim.body_timeout_s:g} s (--body-timeout-s)")(
                    scope, receive, send)
        finally:
            self.in_flight -= 1
            self.held -= state["reserved"]
            if state["reserved"] > 8 * 2**20:
                release_memory()


class BodyTimeout(Exception):
    pass


class Metrics:
    """The Prometheus metrics of one app, in a registry of its own."""

    def __init__(self, service: Service):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("protext_requests", "HTTP requests by path and status", ["path", "status"],
                                registry=self.registry)
        self.latency = Histogram("protext_request_seconds", "time to answer a classify request",
                                 buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
                                 registry=self.registry)
        self.batch = Histogram("protext_batch_images", "images per forward pass of the image tower",
                               buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=self.registry)
        Gauge("protext_queue_images", "images waiting for the model", registry=self.registry).set_function(
            lambda: service.batcher.waiting if service.batcher else 0)
        Gauge("protext_label_sets_cached", "label sets whose class embeddings are kept", registry=self.registry
              ).set_function(lambda: len(service._cache) + len(service._pinned))
        Gauge("protext_label_sets_waiting", "new label sets waiting to be encoded", registry=self.registry
              ).set_function(lambda: len(service._building))

    def text(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


class Recorded:
    """ASGI middleware counting every answer by path and status, and timing classify requests."""

    PATHS = ("/v1/classify", "/v1/label-sets", "/healthz", "/readyz", "/metrics", "/")

    def __init__(self, app: ASGIApp, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status, started = [500], time.perf_counter()

        async def watched(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, watched)
        finally:
            path = scope["path"] if scope["path"] in self.PATHS else "other"
            self.metrics.requests.labels(path, str(status[0])).inc()
            if path == "/v1/classify":
                self.metrics.latency.observe(time.perf_counter() - started)


def page() -> str:
    """The web page at `/`, shipped as package data."""
    return files("protext").joinpath("web", "index.html").read_text(encoding="utf-8")


# The page loads nothing but itself and the API; thumbnails are local blob: URLs.
PAGE_POLICY = ("default-src 'self'; img-src 'self' blob: data:; style-src 'self' 'unsafe-inline'; "
               "script-src 'self' 'unsafe-inline'; connect-src 'self'; frame-ancestors 'none'; form-action 'self'")

FORM_FIELDS = {
    "images": {"type": "array", "items": {"type": "string", "format": "binary"}, "description": "one or more image files"},
    "labels": {"type": "array", "items": {"type": "string"}, "description": "one field per label; or use label_set"},
    "label_set": {"type": "string", "description": "name of a label set loaded at start (GET /v1/label-sets); "
                                                   "default: the first"},
    "head": {"type": "string", "description": "clip, clip80, cupl, protext, ... or heads joined with '+'; default: "
                                              "the server's"},
    "top_k": {"type": "integer", "description": "labels per image; default: the server's"},
    "activation": {"type": "string", "enum": ["softmax", "sigmoid"], "description": "softmax: probabilities over "
                   "the labels, summing to 1; sigmoid: each label's own (SigLIP)"},
    "explain": {"type": "integer", "description": "also return, per image, this many descriptions that weighed most "
                                                 "for its top label (heads built from texts); default 0"},
}


async def _form(request: Request, limits: Limits) -> tuple[Any, dict[str, Any]]:
    """The classify form (to close when done) and its fields, parsed with limits that let
    `--max-labels` and `--max-images` speak first."""
    try:
        form = await request.form(max_files=limits.max_images + 1, max_fields=limits.max_labels + len(FORM_FIELDS))
    except MultiPartException as e:
        if "Too many files" in str(e):
            raise ApiError(413, f"more than {limits.max_images} images in one request (--max-images)") from e
        if "Too many fields" in str(e):
            raise ApiError(413, f"more than {limits.max_labels} labels in one request (--max-labels)") from e
        raise ApiError(400, f"malformed multipart form: {e}") from e
    try:
        return form, _fields(form)
    except ApiError:
        await form.close()
        raise


def _fields(form) -> dict[str, Any]:
    """The classify request's fields from the parsed form, each checked (422 names the field)."""
    unknown = sorted(set(form) - set(FORM_FIELDS))
    if unknown:
        raise ApiError(422, f"unknown form field(s) {', '.join(map(repr, unknown))}; known: {', '.join(FORM_FIELDS)}")
    images = form.getlist("images")
    if any(not isinstance(f, UploadFile) for f in images):
        raise ApiError(422, "images: every 'images' field must be a file upload")
    single = {}
    for name in ("label_set", "head", "top_k", "activation", "explain"):
        values = form.getlist(name)
        if len(values) > 1:
            raise ApiError(422, f"{name}: given {len(values)} times")
        if values and not isinstance(values[0], str):
            raise ApiError(422, f"{name}: must be text, not a file")
        single[name] = values[0] if values else None
    labels = form.getlist("labels")
    if any(not isinstance(v, str) for v in labels):
        raise ApiError(422, "labels: must be text, not files")
    whole = {}
    for name in ("top_k", "explain"):
        whole[name] = single[name]
        if whole[name] is not None:
            try:
                whole[name] = int(whole[name])
            except ValueError:
                raise ApiError(422, f"{name}: must be a whole number, got {single[name]!r}") from None
    return {"images": images, "labels": labels or None, "label_set": single["label_set"], "head": single["head"],
            "top_k": whole["top_k"], "activation": single["activation"] or "softmax", "explain": whole["explain"] or 0}


async def _until_disconnect(request: Request) -> None:
    """Returns when the client closes its connection (the body has been read by then)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def create_app(service: Service, access: Access = Access(), bind: str = "127.0.0.1") -> FastAPI:
    """The FastAPI app with its middleware (see the module's docstring). Interactive docs are off
    (they load scripts from a CDN); the schema is at `/openapi.json`."""
    metrics = Metrics(service)
    limits = service.limits

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        worker = service.start(observe=metrics.batch.observe)
        try:
            yield
        finally:
            worker.cancel()
            service.close()

    app = FastAPI(title="protext", version=__version__, lifespan=lifespan, docs_url=None,
                  redoc_url=None, description="Zero-shot image classification with CLIP and ProText prompts, for any "
                                              "label set. Errors are JSON: {\"error\": \"what was wrong\"}.")
    app.add_middleware(BodyLimits, limits=limits)
    app.add_middleware(Recorded, metrics=metrics)
    app.add_middleware(Gate, access=access, bind=bind)
    errors = {code: {"model": ErrorBody} for code in (400, 401, 403, 408, 413, 415, 421, 422, 503, 504)}
    html = page()

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError) -> JSONResponse:
        return _error(e.status, e.message, {"Retry-After": "1"} if e.status == 503 else None)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        return _error(e.status_code, str(e.detail), getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def internal(request: Request, e: Exception) -> JSONResponse:  # uvicorn logs the traceback
        log.error("internal error", exc_info=e)
        return _error(500, "internal error; the server log has the details")

    @app.post("/v1/classify", response_model=Classified, response_model_exclude_unset=True, responses=errors,
              summary="Top-k labels with probabilities for each uploaded image",
              openapi_extra={"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
                  "type": "object", "required": ["images"], "properties": FORM_FIELDS}}}}})
    async def classify(request: Request) -> dict:
        form, fields = await _form(request, limits)
        uploads = [(f.filename or f"image {i + 1}", f.file) for i, f in enumerate(fields.pop("images"))]
        work = asyncio.ensure_future(service.classify(uploads, **fields))
        gone = asyncio.ensure_future(_until_disconnect(request))
        try:
            done, _ = await asyncio.wait({work, gone}, timeout=limits.request_timeout_s,
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if work.done():
                await form.close()
        if work in done:
            return work.result()
        work.cancel()  # the client left, or the deadline passed: its work stops
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await work
        await form.close()
        if gone in done:
            return Response(status_code=499)  # nobody reads it
        raise ApiError(504, f"the request took longer than {limits.request_timeout_s:g} s (--request-timeout-s); "
                            f"its work was stopped")

    @app.get("/v1/label-sets", response_model=LabelSets, summary="The label sets loaded at start, heads and defaults")
    async def label_sets() -> dict:
        return service.info()

    @app.get("/healthz", summary="Liveness: the server answers; batching counters and limits")
    async def healthz() -> dict:
        return service.health()

    @app.get("/readyz", summary="Readiness: whether a request sent now would be served", responses={503: {}})
    async def readyz() -> JSONResponse:
        ready, body = service.readiness()
        return JSONResponse(body, status_code=200 if ready else 503)

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response)
    async def prometheus() -> Response:
        return Response(metrics.text(), media_type="text/plain; version=0.0.4")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(html, headers={"Content-Security-Policy": PAGE_POLICY, "X-Frame-Options": "DENY"})

    return app


class DrainingServer(uvicorn.Server):
    """uvicorn's server; SIGTERM or Ctrl-C drains (then exit 0), a second one of either stops at once."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handle(sig, frame) -> None:
            if self.should_exit:
                self.force_exit = True
            self.should_exit = True

        original = {sig: signal.signal(sig, handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)


def run(service: Service, host: str = "127.0.0.1", port: int = 8000, access: Access = Access()) -> None:
    """Serve the app with uvicorn until SIGTERM or Ctrl-C, then drain and return."""
    lim = service.limits
    config = uvicorn.Config(create_app(service, access, host), host=host, port=port, log_level="info",
                            http=guard(lim), timeout_graceful_shutdown=max(1, round(lim.drain_timeout_s)),
                            timeout_keep_alive=5, limit_concurrency=lim.max_connections + 16)
    DrainingServer(config).run()
    for sig in (signal.SIGINT, signal.SIGTERM):  # drained: a late signal must not turn exit 0 into a kill
        signal.signal(sig, signal.SIG_IGN)
