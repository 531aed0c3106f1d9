"""Label Studio's REST API, through ``label-studio-sdk``: the calls pre-annotation needs.

The SDK pages task lists, refreshes personal access tokens and retries what is worth retrying;
this module adds usam's errors and plain-dict results. Task media are not fetched here but by
the guarded downloader (:mod:`usam_backend.labelstudio.media`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
from label_studio_sdk.client import LabelStudio
from label_studio_sdk.core.api_error import ApiError

from usam_backend.core.errors import UsamError
from usam_backend.core.fetch import ImageFetchError, check_not_forbidden, redact_url
from usam_backend.core.settings import Settings
from usam_backend.labelstudio.projects import ProjectRecord, label_studio_origin

PAGE_SIZE = 100


class LabelStudioApiError(UsamError):
    """Label Studio's API answered with an error or could not be reached."""


class LabelStudioApi:
    """The project, its tasks and their predictions, as plain dicts (legacy token or PAT)."""

    def __init__(self, url: str, api_key: str, client: httpx.Client, timeout: float = 30.0):
        self.url = url.rstrip("/")
        self.sdk = LabelStudio(base_url=self.url, api_key=api_key, httpx_client=client, timeout=timeout)

    @classmethod
    def for_project(cls, settings: Settings, record: ProjectRecord | None, client: httpx.Client) -> LabelStudioApi:
        """The project's Label Studio and the credentials that may go there (:func:`label_studio_origin`)."""
        origin = label_studio_origin(settings, record)
        if not origin.url:
            raise LabelStudioApiError("Label Studio's URL is unknown: set LABEL_STUDIO_URL")
        token = origin.api_key or origin.setup_token
        if not token:
            raise LabelStudioApiError("no Label Studio token: set LABEL_STUDIO_API_KEY")
        if not origin.named_by_operator:  # a /setup hostname: never a link-local, multicast or reserved address
            try:
                check_not_forbidden(origin.url)
            except ImageFetchError as exc:
                raise LabelStudioApiError(str(exc)) from None
        return cls(origin.url, token, client)

    def project(self, pid: str) -> dict[str, Any]:
        return self._call(f"GET /api/projects/{pid}/", lambda: _plain(self.sdk.projects.get(id=int(pid))))

    def tasks(self, pid: str) -> Iterator[dict[str, Any]]:
        """Every task of the project, with its predictions (the SDK's pager walks the pages)."""
        return self._task_pages(pid)

    def tasks_with_results(self, pid: str) -> Iterator[dict[str, Any]]:
        """Every task of the project with its annotations and predictions in full (``fields=all``)."""
        return self._task_pages(pid, fields="all")

    def _task_pages(self, pid: str, **params: Any) -> Iterator[dict[str, Any]]:
        pages = self._call(
            "GET /api/tasks/", lambda: self.sdk.tasks.list(project=int(pid), page_size=PAGE_SIZE, **params)
        )
        iterator = iter(pages)
        while True:
            item = self._call("GET /api/tasks/", lambda: next(iterator, None))
            if item is None:
                return
            yield _plain(item)

    def task(self, task_id: int) -> dict[str, Any]:
        return self._call(f"GET /api/tasks/{task_id}/", lambda: _plain(self.sdk.tasks.get(id=str(task_id))))

    def predictions(self, task_id: int) -> list[dict[str, Any]]:
        """The task's predictions (model_version, result, score)."""
        found = self._call("GET /api/predictions/", lambda: self.sdk.predictions.list(task=task_id))
        return [_plain(p) for p in found or []]

    def prediction_versions(self, task_id: int) -> set[str]:
        found = self._call("GET /api/predictions/", lambda: self.sdk.predictions.list(task=task_id))
        return {str(_plain(p).get("model_version")) for p in found or []}

    def create_prediction(self, pid: str, task_id: int, prediction: dict[str, Any]) -> None:
        self._call(
            "POST /api/predictions/",
            lambda: self.sdk.predictions.create(
                task=task_id,
                project=int(pid),
                result=prediction["result"],
                score=prediction.get("score"),
                model_version=prediction.get("model_version"),
            ),
        )

    def _call(self, what: str, call: Any) -> Any:
        try:
            return call()
        except ApiError as exc:
            body = str(exc.body)[:200]
            if exc.status_code == 401:
                raise LabelStudioApiError(f"Label Studio refused the token for {what} (HTTP 401)") from None
            raise LabelStudioApiError(f"Label Studio answered {what} with HTTP {exc.status_code}: {body}") from None
        except httpx.HTTPError as exc:
            raise LabelStudioApiError(f"Label Studio at {redact_url(self.url)} is unreachable: {exc}") from None


def versions_of(task: dict[str, Any]) -> set[str]:
    """Model versions of a listed task's predictions (the list API gives them one way or another)."""
    found = {str(p.get("model_version")) for p in task.get("predictions") or [] if isinstance(p, dict)}
    found |= {str(v) for v in task.get("predictions_model_versions") or []}
    return found


def _plain(item: Any) -> dict[str, Any]:
    """An SDK model as a plain dict of JSON values."""
    if isinstance(item, dict):
        return item
    return dict(item.model_dump(mode="json", by_alias=True))
