"""The admin API as the chaos run uses it: every call rides out a restart of PostgreSQL or
RabbitMQ (a refused connection or a 503 is tried again), and lists are followed page by page.
Any other answer goes back to the caller: a 500 is a bug the run's checks must see."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx

PAGE = 500


class ApiUnavailable(Exception):
    """The API did not answer usefully within the patience given."""


class Api:
    def __init__(self, base_url: str, token: str) -> None:
        self._client = httpx.AsyncClient(
            base_url=base_url,
            headers={"Authorization": f"Bearer {token}"},
            timeout=15,
            limits=httpx.Limits(max_connections=32),
        )
        self.retries = 0
        """Calls tried again after a broken connection or a 503."""
        self.server_errors: list[str] = []
        """Answers with a 5xx other than 503: never expected, whatever the faults."""

    async def close(self) -> None:
        await self._client.aclose()

    async def call(
        self,
        method: str,
        path: str,
        *,
        patience: float = 60.0,
        **kwargs: Any,
    ) -> httpx.Response:
        """The first answer that is not a 503; a refused or broken connection is tried again
        (with the same request, so an Idempotency-Key in it makes that safe)."""
        deadline = time.monotonic() + patience
        delay = 0.2
        while True:
            try:
                response = await self._client.request(method, path, **kwargs)
                if response.status_code != 503:
                    if response.status_code >= 500:
                        what = f"{method} {path}: {response.status_code} {response.text[:200]}"
                        self.server_errors.append(what)
                    return response
                last = f"{response.status_code} {response.text[:200]}"
            except httpx.TransportError as exc:
                last = repr(exc)
            if time.monotonic() + delay > deadline:
                raise ApiUnavailable(f"{method} {path}: {last}")
            self.retries += 1
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)

    async def items(
        self, path: str, params: dict[str, Any] | None = None, patience: float = 60.0
    ) -> list[dict[str, Any]]:
        """Every item of a paginated list."""
        found: list[dict[str, Any]] = []
        query = {**(params or {}), "limit": PAGE}
        while True:
            response = await self.call("GET", path, params=query, patience=patience)
            response.raise_for_status()
            body = response.json()
            found.extend(body["items"])
            if not body.get("next_cursor"):
                return found
            query["cursor"] = body["next_cursor"]

    async def ready(self) -> bool:
        try:
            return (await self._client.get("/readyz", timeout=3)).status_code == 200
        except httpx.HTTPError:
            return False
