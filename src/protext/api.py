"""The HTTP layer of `protext serve`: a FastAPI app over a `serve.Service`.

`POST /v1/classify`, `GET /v1/label-sets` and `GET /healthz`, documented by the OpenAPI
schema at `/openapi.json`, and the web page at `/`, which uses only those. Every error is
JSON, `{"error": "what was wrong"}`: refusals of the service (`ApiError`) with their 4xx
status, malformed requests with 422, and anything unexpected with a 500 that names nothing
internal (the traceback goes to the server log only). `RequestLimits` refuses bodies over
the upload limit and requests over the in-flight limit before a byte of the body is read.
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from importlib.resources import files

from . import __version__
from .errors import ProtextError
from .serve import ApiError, Limits, Service

try:
    import uvicorn
    from fastapi import FastAPI, File, Form, Request, UploadFile
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse
    from pydantic import BaseModel
    from starlette.exceptions import HTTPException
    from starlette.types import ASGIApp, Message, Receive, Scope, Send
except ImportError as e:  # an optional extra: say how to get it instead of a bare ImportError
    raise ProtextError(f"protext serve needs fastapi, uvicorn and python-multipart ({e}); "
                       f"install them with: pip install -e '.[serve]' (protext's 'serve' extra)") from e


class Prob(BaseModel):
    label: str
    prob: float


class ImageResult(BaseModel):
    image: str
    top: list[Prob]


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
    top_k: int
    backbone: str
    prompts: bool


class ErrorBody(BaseModel):
    error: str


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


class RequestLimits:
    """ASGI middleware: refuses POST bodies over `max_upload_bytes` and more than `max_requests`
    at once, before the body is read. A body without a length (chunked) is read up to the limit
    first, so the limit holds for it too."""

    def __init__(self, app: ASGIApp, limits: Limits):
        self.app, self.limits, self.in_flight = app, limits, 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        lim = self.limits
        length = dict(scope["headers"]).get(b"content-length")
        if self.in_flight >= lim.max_requests:
            refusal = _error(503, f"server busy: {self.in_flight} requests in flight (--max-requests); retry shortly",
                             {"Retry-After": "1"})
        elif length is not None and not length.isdigit():
            refusal = _error(400, "malformed Content-Length header")
        elif length is not None and int(length) > lim.max_upload_bytes:
            refusal = _error(413, self.too_large())
        else:
            self.in_flight += 1
            try:
                if length is None:
                    receive = await self._buffered(receive, send, scope)
                if receive is not None:
                    await self.app(scope, receive, send)
            finally:
                self.in_flight -= 1
            return
        await refusal(scope, receive, send)

    def too_large(self) -> str:
        return (f"request body over the limit of {self.limits.max_upload_mb:g} MiB (--max-upload-mb); send fewer or "
                f"smaller images per request")

    async def _buffered(self, receive: Receive, send: Send, scope: Scope) -> Receive | None:
        """The whole body of a request without a length, read up to the limit; None once refused or gone."""
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return None
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > self.limits.max_upload_bytes:
                await _error(413, self.too_large())(scope, receive, send)
                return None
        body, sent = b"".join(chunks), False

        async def replay() -> Message:
            nonlocal sent
            if sent:
                return await receive()
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        return replay


def page() -> str:
    """The web page at `/`, shipped as package data."""
    return files("protext").joinpath("web", "index.html").read_text(encoding="utf-8")


# The page loads nothing but itself and the API; thumbnails are local blob: URLs.
PAGE_POLICY = ("default-src 'self'; img-src 'self' blob: data:; style-src 'self' 'unsafe-inline'; "
               "script-src 'self' 'unsafe-inline'; connect-src 'self'")


def create_app(service: Service) -> FastAPI:
    """The FastAPI app: `POST /v1/classify`, `GET /v1/label-sets`, `GET /healthz`, the page at `/`.

    Interactive docs are off (they load scripts from a CDN); the schema is at `/openapi.json`.
    """

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        worker = service.start()
        try:
            yield
        finally:
            worker.cancel()
            service.close()

    app = FastAPI(title="protext", version=__version__, lifespan=lifespan, docs_url=None,
                  redoc_url=None, description="Zero-shot image classification with CLIP and ProText prompts, for any "
                                              "label set. Errors are JSON: {\"error\": \"what was wrong\"}.")
    app.add_middleware(RequestLimits, limits=service.limits)
    errors = {code: {"model": ErrorBody} for code in (400, 413, 415, 422, 503)}
    html = page()

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError) -> JSONResponse:
        return _error(e.status, e.message, {"Retry-After": "1"} if e.status == 503 else None)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        what = "; ".join(f"{'.'.join(str(p) for p in err['loc'][1:]) or 'body'}: {err['msg']}" for err in e.errors())
        return _error(422, what)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        return _error(e.status_code, str(e.detail), getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def internal(request: Request, e: Exception) -> JSONResponse:  # uvicorn logs the traceback
        return _error(500, "internal error; the server log has the details")

    @app.post("/v1/classify", response_model=Classified, responses=errors,
              summary="Top-k labels with probabilities for each uploaded image")
    async def classify(images: list[UploadFile] = File(..., description="one or more image files"),
                       labels: list[str] | None = Form(None, description="one field per label; or use label_set"),
                       label_set: str | None = Form(None, description="name of a label set loaded at start "
                                                                      "(GET /v1/label-sets); default: the first"),
                       head: str | None = Form(None, description="clip, clip80, cupl, protext, ... or heads joined "
                                                                 "with '+'; default: the server's"),
                       top_k: int | None = Form(None, description="labels per image; default: the server's"),
                       activation: str = Form("softmax", description="softmax: probabilities over the labels, "
                                                                     "summing to 1; sigmoid: each label's own (SigLIP)"),
                       ) -> dict:
        uploads = [(f.filename or f"image {i + 1}", await f.read()) for i, f in enumerate(images)]
        return await service.classify(uploads, labels, label_set, head, top_k, activation)

    @app.get("/v1/label-sets", response_model=LabelSets, summary="The label sets loaded at start, heads and defaults")
    async def label_sets() -> dict:
        return service.info()

    @app.get("/healthz", summary="Liveness, batching counters and limits")
    async def healthz() -> dict:
        return service.health()

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(html, headers={"Content-Security-Policy": PAGE_POLICY})

    return app


def run(service: Service, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve the app with uvicorn until interrupted."""
    uvicorn.run(create_app(service), host=host, port=port, log_level="info")
