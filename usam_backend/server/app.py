"""The HTTP adapter: Label Studio's ML-backend protocol over FastAPI, schemas validated.

Parse the request, call :class:`~usam_backend.server.service.Backend`, format the answer. Errors become
JSON ``{"error": ...}`` with a 4xx status (5xx only for our own faults); never a traceback.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable
from typing import Any, TypeVar

import anyio
import anyio.to_thread
from fastapi import Depends, FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.security import HTTPBasic, HTTPBasicCredentials
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from usam_backend.core.errors import ImageError, UsamError
from usam_backend.core.fetch import ImageFetchError
from usam_backend.labelstudio.config import LabelConfigError
from usam_backend.labelstudio.interactive import PromptError
from usam_backend.labelstudio.projects import UnknownProjectError
from usam_backend.server.service import Backend, PredictRequest

log = logging.getLogger("usam.http")

T = TypeVar("T")

MAX_REQUEST_BYTES = 64 * 1024 * 1024
WEBHOOK_SECRET_HEADER = "X-Usam-Webhook-Secret"


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)


class SetupRequest(_Open):
    project: str | int
    label_config: str = Field(alias="schema", description="the project's label config (XML)")
    hostname: str | None = Field(None, description="Label Studio's public URL")
    access_token: str | None = Field(None, description="the project creator's legacy API token")
    extra_params: dict[str, Any] | None = None


class SetupResponse(BaseModel):
    model_version: str


class Task(_Open):
    id: int | None = None
    data: dict[str, Any]


class PredictParams(_Open):
    login: str | None = None
    password: str | None = None
    context: dict[str, Any] | None = None


class PredictBody(_Open):
    tasks: list[Task]
    project: str | int | None = None
    label_config: str | None = None
    params: PredictParams | None = None


class Prediction(BaseModel):
    result: list[dict[str, Any]]
    score: float
    model_version: str


class PredictResponse(BaseModel):
    results: list[Prediction | list[Prediction]] = Field(
        description="exactly one element per task, in the order of the tasks: its prediction, or an empty list "
        "(no prediction yet) for a task handed to pre-annotation jobs because the batch ran out of time"
    )


class WebhookBody(_Open):
    action: str


class WebhookResponse(BaseModel):
    status: str
    action: str


class Liveness(BaseModel):
    status: str


class VersionsResponse(BaseModel):
    versions: list[str]


class ErrorResponse(BaseModel):
    error: str
    details: list[dict[str, Any]] | None = None


ERROR_STATUS: list[tuple[type[UsamError], int]] = [
    (UnknownProjectError, 404),
    (LabelConfigError, 422),
    (PromptError, 422),
    (ImageFetchError, 422),
    (ImageError, 422),
    (UsamError, 400),
]


def create_app(backend: Backend, *, loopback_only: bool = False) -> FastAPI:
    """The FastAPI app over ``backend``.

    ``loopback_only``: the server listens on a loopback address only, so every caller is on this
    machine; then a ``/setup`` hostname is trusted without authentication (zero-config local use).
    """
    settings = backend.settings
    # httpx logs every request's full URL at INFO, presigned signatures included: keep its warnings only
    logging.getLogger("httpx").setLevel(logging.WARNING)
    app = FastAPI(
        title="usam",
        version="0.1.0",
        description="Label Studio ML backend: Segment Anything that knows your labels.",
        responses={422: {"model": ErrorResponse}, 401: {"model": ErrorResponse}},
        docs_url=None,  # served below, behind basic auth like every route but /ping and /webhook
        redoc_url=None,
        openapi_url=None,
    )
    basic = HTTPBasic(auto_error=False)
    basic_configured = bool(settings.basic_auth_user and settings.basic_auth_pass)
    if not loopback_only and not basic_configured:
        warning = (
            "usam listens beyond loopback without authentication: anyone who can reach it can run predictions "
            "and read /health; set BASIC_AUTH_USER and BASIC_AUTH_PASS (and USAM_WEBHOOK_SECRET)"
        )
        log.warning(warning)
        backend.warnings.append(warning)
    admission = Admission(settings.max_pending_predictions)

    def valid_basic(credentials: HTTPBasicCredentials | None) -> bool:
        user, password = settings.basic_auth_user or "", settings.basic_auth_pass or ""
        return bool(
            basic_configured
            and credentials is not None
            and secrets.compare_digest(credentials.username.encode(), user.encode())
            & secrets.compare_digest(credentials.password.encode(), password.encode())
        )

    def authorised(credentials: HTTPBasicCredentials | None = Depends(basic)) -> bool:
        """Basic auth when configured; True when the caller proved who it is."""
        if not basic_configured:
            return False
        if not valid_basic(credentials):
            raise HTTPException(401, "basic auth required (BASIC_AUTH_USER)", headers={"WWW-Authenticate": "Basic"})
        return True

    protected = [Depends(authorised)]

    @app.get("/ping", response_model=Liveness)
    def ping() -> Liveness:
        """Liveness, without authentication and without details (container health checks)."""
        return Liveness(status="UP")

    @app.get("/health", dependencies=protected)
    async def health() -> dict[str, Any]:
        """Status, SAM type and device, the heads on disk, and per project which head serves it (or why none)."""
        return await admission.control(backend.health)

    @app.post("/setup", response_model=SetupResponse)
    def setup(body: SetupRequest, authenticated: bool = Depends(authorised)) -> SetupResponse:
        """Read the project's label config; answer the model_version of the head serving its labels."""
        version = backend.setup(
            str(body.project), body.label_config, body.hostname, body.access_token,
            trust_hostname=authenticated or loopback_only,
        )  # fmt: skip
        return SetupResponse(model_version=version)

    @app.post(
        "/predict", response_model=PredictResponse, dependencies=protected,
        responses={503: {"model": ErrorResponse, "description": "too many predictions pending: retry later"}},
    )  # fmt: skip
    async def predict(body: PredictBody) -> PredictResponse:
        """Brush pre-annotations for a batch of tasks, or one mask for a smart-tool prompt."""
        params = body.params.model_dump(exclude_none=True) if body.params else {}
        request = PredictRequest(
            tasks=[task.model_dump() for task in body.tasks],
            project=None if body.project is None else str(body.project),
            label_config=body.label_config,
            params=params,
        )
        results = await admission.predict(lambda: backend.predict(request))
        return PredictResponse(
            results=[[Prediction(**q) for q in p] if isinstance(p, list) else Prediction(**p) for p in results]
        )

    @app.post("/webhook", response_model=WebhookResponse)
    async def webhook(
        body: WebhookBody,
        secret: str | None = Header(None, alias=WEBHOOK_SECRET_HEADER),
        credentials: HTTPBasicCredentials | None = Depends(basic),
    ) -> WebhookResponse:
        """Every Label Studio webhook event is accepted and recorded; nothing is trained here.

        With ``USAM_WEBHOOK_SECRET`` or basic auth configured, a request must carry the secret header
        or the basic-auth credentials: Label Studio's webhooks carry the header, *Start training*
        (an ML-backend call, without webhook headers) carries the connection's basic auth."""
        expected = settings.webhook_secret
        good_secret = bool(expected and secret and secrets.compare_digest(secret.encode(), expected.encode()))
        if (expected or basic_configured) and not (good_secret or valid_basic(credentials)):
            raise HTTPException(401, f"missing or wrong {WEBHOOK_SECRET_HEADER} header (or basic auth)")
        payload = body.model_dump(by_alias=True)
        action = await admission.control(lambda: backend.webhook(payload))
        return WebhookResponse(status="ok", action=action)

    @app.get("/jobs", dependencies=protected)
    def jobs() -> dict[str, Any]:
        """Training jobs: runner (rq or embedded), queue fault if any, and each job's stage and progress."""
        return backend.training_status()

    @app.get("/versions", response_model=VersionsResponse, dependencies=protected)
    def versions() -> VersionsResponse:
        """model_versions of the heads this backend can serve."""
        return VersionsResponse(versions=backend.versions())

    _install_docs(app, protected)
    _install_error_handlers(app)
    app.add_middleware(BodyLimit, limit=MAX_REQUEST_BYTES)
    return app


class Admission:
    """Keeps the control endpoints responsive while predictions queue.

    Predictions run on their own threads, at most ``pending`` at once (one computes at a time, the
    rest wait their turn); one more gets 503 with ``Retry-After`` rather than piling up threads.
    ``/health`` and ``/webhook`` run on threads of their own, so they answer however many
    predictions are in flight."""

    RETRY_AFTER = 10

    def __init__(self, pending: int):
        self.pending = pending
        self.waiting = 0
        self._predict: anyio.CapacityLimiter | None = None
        self._control: anyio.CapacityLimiter | None = None

    async def predict(self, work: Callable[[], T]) -> T:
        if self.waiting >= self.pending:
            raise HTTPException(
                503, f"{self.waiting} predictions are pending (USAM_MAX_PENDING_PREDICTIONS); retry later",
                headers={"Retry-After": str(self.RETRY_AFTER)},
            )  # fmt: skip
        self._predict = self._predict or anyio.CapacityLimiter(self.pending)
        self.waiting += 1
        try:
            return await anyio.to_thread.run_sync(work, limiter=self._predict)
        finally:
            self.waiting -= 1

    async def control(self, work: Callable[[], T]) -> T:
        self._control = self._control or anyio.CapacityLimiter(4)
        return await anyio.to_thread.run_sync(work, limiter=self._control)


def _install_docs(app: FastAPI, protected: list[Any]) -> None:
    """``/openapi.json``, ``/docs`` and ``/redoc``, with the same authentication as the API they describe."""

    @app.get("/openapi.json", include_in_schema=False, dependencies=protected)
    def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    @app.get("/docs", include_in_schema=False, dependencies=protected)
    def docs() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url="/openapi.json", title=f"{app.title} - Swagger UI")

    @app.get("/redoc", include_in_schema=False, dependencies=protected)
    def redoc() -> HTMLResponse:
        return get_redoc_html(openapi_url="/openapi.json", title=f"{app.title} - ReDoc")


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        details = [{"where": ".".join(map(str, e.get("loc", ()))), "problem": e.get("msg", "")} for e in exc.errors()]
        return JSONResponse({"error": "the request is not what usam expects", "details": details[:20]}, 422)

    @app.exception_handler(HTTPException)
    async def http_error(_request: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse({"error": str(exc.detail)}, exc.status_code, headers=exc.headers)

    @app.exception_handler(UsamError)
    async def usam_error(request: Request, exc: UsamError) -> JSONResponse:
        status = next(code for kind, code in ERROR_STATUS if isinstance(exc, kind))
        log.info("%s %s -> %d: %s", request.method, request.url.path, status, exc)
        return JSONResponse({"error": str(exc)}, status)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("%s %s failed", request.method, request.url.path)
        return JSONResponse({"error": f"internal error ({type(exc).__name__}); details are in the server log"}, 500)


class BodyLimit:
    """Refuse request bodies over ``limit`` bytes with 413, whether they declare a length or arrive
    chunked: the body is read (up to the limit) before the app sees it."""

    def __init__(self, app: ASGIApp, limit: int):
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await self._refuse(send)
            return
        messages: list[Message] = []
        seen = 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            seen += len(message.get("body", b""))
            if seen > self.limit:
                await self._refuse(send)
                return
            if not message.get("more_body", False):
                break

        async def replay() -> Message:
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, send: Send) -> None:
        response = JSONResponse({"error": f"request body over {self.limit:,} bytes"}, 413)
        await send({"type": "http.response.start", "status": 413, "headers": response.raw_headers})
        await send({"type": "http.response.body", "body": response.body})
