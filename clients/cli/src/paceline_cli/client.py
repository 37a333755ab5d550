"""HTTP to the admin API: the token, problems turned into errors with exit codes, pagination.

- a problem (any 4xx or 5xx) is an `ApiProblem` (exit 1) that shows its title, detail and
  each listed error;
- the API not reachable (refused, DNS, time-out, connection cut) is a `CliError` with exit 3;
- a 503 with `Retry-After` (an outage the API expects to end soon) is asked again, up to
  `ATTEMPTS` times in all, for requests that are safe to repeat: reads, and requests that carry
  an `Idempotency-Key` (which are also asked again after a connection cut or a time-out).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import httpx

from paceline_cli import __version__
from paceline_cli.errors import REFUSED, UNREACHABLE, USAGE, ApiProblem, CliError
from paceline_cli.settings import CliSettings, shown_url

ATTEMPTS = 3
MAX_RETRY_AFTER_S = 5.0
PAGE_MAX = 500
"""The most items a paginated route gives per page (docs/api.md, Pagination)."""

Params = Mapping[str, str | int | list[str]]


class Client:
    """One admin API, with the settings' token on every request."""

    def __init__(self, settings: CliSettings) -> None:
        token = settings.token.get_secret_value().strip() if settings.token else ""
        if not token:
            raise CliError(
                "PACELINE_TOKEN is not set: every /v1 route needs a token of the admin API "
                "(`make run` prints one). Export it: export PACELINE_TOKEN=...",
                USAGE,
            )
        self.url = settings.url
        self.timeout_s = settings.timeout_s
        self._http = httpx.Client(
            base_url=settings.url,
            headers={
                "Authorization": f"Bearer {token}",
                "Accept": "application/json",
                "User-Agent": f"paceline-cli/{__version__}",
            },
            timeout=settings.timeout_s,
            follow_redirects=False,
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def request(
        self,
        method: str,
        path: str,
        *,
        params: Params | None = None,
        json: Any = None,
        content: bytes | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> httpx.Response:
        """The answer, when it is a success (2xx); otherwise an `ApiProblem` or a `CliError`."""
        repeatable = method == "GET" or bool(headers and "Idempotency-Key" in headers)
        for attempt in range(1, ATTEMPTS + 1):
            try:
                response = self._http.request(
                    method, path, params=params, json=json, content=content, headers=headers
                )
            except httpx.TransportError as exc:
                sent = not isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout)
                if repeatable and sent and attempt < ATTEMPTS:
                    time.sleep(0.5 * attempt)
                    continue
                raise self._unreachable(exc) from None
            if response.status_code == 503 and repeatable and attempt < ATTEMPTS:
                delay = _retry_after(response)
                if delay is not None:
                    time.sleep(delay)
                    continue
            if response.is_success:
                return response
            raise problem_of(response)
        raise AssertionError("unreachable")  # the loop returns or raises

    def json(
        self,
        method: str,
        path: str,
        *,
        params: Params | None = None,
        json: Any = None,
        content: bytes | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Any:
        """The answer's JSON body (None for a 204)."""
        response = self.request(
            method, path, params=params, json=json, content=content, headers=headers
        )
        if response.status_code == 204 or not response.content:
            return None
        try:
            return response.json()
        except ValueError:
            raise CliError(
                f"{method} {path} answered {response.status_code} with a body that is not JSON",
                REFUSED,
            ) from None

    def get(self, path: str, params: Params | None = None) -> Any:
        return self.json("GET", path, params=params)

    def pages(
        self,
        path: str,
        params: Params | None = None,
        *,
        limit: int | None = None,
        page_max: int = PAGE_MAX,
    ) -> dict[str, Any]:
        """Items of a paginated route, following `next_cursor` until there are `limit` of them
        (None: all). One page: the API's body as it came. Several: `{"items": [...],
        "next_cursor": ...}`, the cursor of the last page read (null when there are no more)."""
        items: list[Any] = []
        cursor: str | None = None
        read = 0
        while True:
            query: dict[str, Any] = dict(params or {})
            query["limit"] = page_max if limit is None else min(page_max, limit - len(items))
            if cursor:
                query["cursor"] = cursor
            body = self.get(path, query)
            read += 1
            items.extend(body["items"])
            cursor = body.get("next_cursor")
            if not cursor or (limit is not None and len(items) >= limit):
                break
        if read == 1:
            return dict(body)
        return {"items": items, "next_cursor": cursor}

    def _unreachable(self, exc: httpx.TransportError) -> CliError:
        where = shown_url(self.url)
        if isinstance(exc, httpx.TimeoutException):
            what = f"did not answer within {self.timeout_s:g}s (PACELINE_TIMEOUT_S)"
        elif isinstance(exc, httpx.ConnectError):
            what = f"cannot be reached: {_reason(exc)}"
        elif isinstance(exc, httpx.UnsupportedProtocol | httpx.LocalProtocolError):
            return CliError(f"cannot ask {where}: {_reason(exc)}", USAGE)
        else:
            what = f"cut the connection: {_reason(exc)}"
        return CliError(f"the admin API at {where} {what}", UNREACHABLE)


def _reason(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[-1] if text else type(exc).__name__


def _retry_after(response: httpx.Response) -> float | None:
    raw = response.headers.get("Retry-After")
    try:
        return min(MAX_RETRY_AFTER_S, max(0.0, float(raw))) if raw is not None else None
    except ValueError:
        return None


def problem_of(response: httpx.Response) -> ApiProblem:
    """A readable error of a refusal: `<title> (<status>): <detail>`, and each listed error as
    `<path>: <message>`; for a body that is not a problem, its status and the start of it."""
    status = response.status_code
    try:
        body: Any = response.json()
    except ValueError:
        body = None
    lines: list[str] = []
    if isinstance(body, dict) and ("title" in body or "detail" in body):
        title = str(body.get("title") or response.reason_phrase or "Error")
        for item in body.get("errors") or []:
            if isinstance(item, dict):
                lines.append(f"{item.get('path', 'body')}: {item.get('message', '')}")
            else:
                lines.append(str(item))
        detail = str(body.get("detail") or "")
        # A detail that goes on to repeat the listed errors is cut where they begin.
        if lines and (cut := detail.find(lines[0])) > 0:
            detail = detail[:cut].rstrip(" :;")
        message = f"{title} ({status})" + (f": {detail}" if detail else "")
    else:
        text = " ".join(response.text.split())[:200]
        phrase = response.reason_phrase or "Error"
        message = f"HTTP {status} {phrase}" + (f": {text}" if text else "")
    if status == 401:
        lines.append("check PACELINE_TOKEN: it is not a token this API knows (it is not shown)")
    return ApiProblem(status, body, message, lines)
