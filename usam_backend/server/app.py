"""The HTTP adapter: Label Studio's ML-backend protocol over FastAPI, schemas validated.

Parse the request, call :class:`~usam_backend.server.service.Backend`, format the answer. Errors become
JSON ``{"error": ...}`` with a 4xx status (5xx only for our own faults); never a traceback.
"""

from __future__ import annotations

import logging
import secrets
from typing import Any

from fastapi import Depends, FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
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


def create_app(backend: Backend) -> FastAPI:
    settings = backend.settings
    app = FastAPI(
        title="usam",
        version="0.1.0",
        description="Label Studio ML backend: Segment Anything that knows your labels.",
        responses={422: {"model": ErrorResponse}, 401: {"model": ErrorResponse}},
    )
    basic = HTTPBasic(auto_error=False)

    def authorised(credentials: HTTPBasicCredentials | None = Depends(basic)) -> None:
        user, password = settings.basic_auth_user, settings.basic_auth_pass
        if not user or not password:
            return
        if credentials is None or not (
            secrets.compare_digest(credentials.username.encode(), user.encode())
            & secrets.compare_digest(credentials.password.encode(), password.encode())
        ):
            raise HTTPException(401, "basic auth required (BASIC_AUTH_USER)", headers={"WWW-Authenticate": "Basic"})

    protected = [Depends(authorised)]

    @app.get("/health", dependencies=protected)
    def health() -> dict[str, Any]:
        """Status, SAM type and device, the heads on disk, and per project which head serves it (or why none)."""
        return backend.health()

    @app.post("/setup", response_model=SetupResponse, dependencies=protected)
    def setup(body: SetupRequest) -> SetupResponse:
        """Read the project's label config; answer the model_version of the head serving its labels."""
        version = backend.setup(str(body.project), body.label_config, body.hostname, body.access_token)
        return SetupResponse(model_version=version)

    @app.post("/predict", response_model=PredictResponse, dependencies=protected)
    def predict(body: PredictBody) -> PredictResponse:
        """Brush pre-annotations for a batch of tasks, or one mask for a smart-tool prompt."""
        params = body.params.model_dump(exclude_none=True) if body.params else {}
        request = PredictRequest(
            tasks=[task.model_dump() for task in body.tasks],
            project=None if body.project is None else str(body.project),
            label_config=body.label_config,
            params=params,
        )
        return PredictResponse(
            results=[
                [Prediction(**q) for q in p] if isinstance(p, list) else Prediction(**p)
                for p in backend.predict(request)
            ]
        )

    @app.post("/webhook", response_model=WebhookResponse)
    def webhook(
        body: WebhookBody,
        secret: str | None = Header(None, alias=WEBHOOK_SECRET_HEADER),
        credentials: HTTPBasicCredentials | None = Depends(basic),
    ) -> WebhookResponse:
        """Every Label Studio webhook event is accepted and recorded; nothing is trained here.

        Label Studio's webhooks carry the shared-secret header (USAM_WEBHOOK_SECRET). START_TRAINING
        is different: Label Studio sends it as an ML-backend call, with the connection's basic auth
        and without webhook headers, so it is checked like /predict."""
        expected = settings.webhook_secret
        if body.action == "START_TRAINING" and not (secret and expected):
            authorised(credentials)
        elif expected and not (secret and secrets.compare_digest(secret.encode(), expected.encode())):
            raise HTTPException(401, f"missing or wrong {WEBHOOK_SECRET_HEADER} header")
        action = backend.webhook(body.model_dump(by_alias=True))
        return WebhookResponse(status="ok", action=action)

    @app.get("/jobs", dependencies=protected)
    def jobs() -> dict[str, Any]:
        """Training jobs: runner (rq or embedded), queue fault if any, and each job's stage and progress."""
        return backend.training_status()

    @app.get("/versions", response_model=VersionsResponse, dependencies=protected)
    def versions() -> VersionsResponse:
        """model_versions of the heads this backend can serve."""
        return VersionsResponse(versions=backend.versions())

    _install_error_handlers(app)
    app.add_middleware(BodyLimit, limit=MAX_REQUEST_BYTES)
    return app


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
    """Refuse request bodies over ``limit`` bytes with 413, whether or not they declare a length."""

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
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise _TooLarge
            return message

        try:
            await self.app(scope, limited, send)
        except _TooLarge:
            await self._refuse(send)

    async def _refuse(self, send: Send) -> None:
        response = JSONResponse({"error": f"request body over {self.limit:,} bytes"}, 413)
        await send({"type": "http.response.start", "status": 413, "headers": response.raw_headers})
        await send({"type": "http.response.body", "body": response.body})


class _TooLarge(Exception):
    pass
