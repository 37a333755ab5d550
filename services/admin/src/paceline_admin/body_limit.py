"""The request body limit: the framework's (FastAPI's `max_body_size`, on Starlette's
`RequestBodyLimitMiddleware`), with the project's problem on every 413.

The framework refuses a body over the limit in two ways, and only one of them reaches the
app's exception handlers:

- a body counted as it arrives (chunked, or longer than its `Content-Length` says) raises a
  413 `HTTPException` where the route reads it: `problems` answers it as `body-too-large`;
- a body whose `Content-Length` declares more is answered by the framework itself, with a
  plain-text `413 Content Too Large` that replaces whatever the app answered (no handler sees
  it). `ProblemsFor413` replaces that answer, on its way out, with the same problem.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from paceline_admin.problems import PROBLEM_JSON, body_too_large


class ProblemsFor413:
    """Pure ASGI: a 413 that is not a problem already (the framework's plain text) goes out
    as the `body-too-large` problem. Nothing else is touched, and nothing is buffered."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        replaced = False

        async def send_problem(message: Message) -> None:
            nonlocal replaced
            if message["type"] == "http.response.start" and message["status"] == 413:
                media = Headers(raw=list(message.get("headers", []))).get("content-type")
                if media != PROBLEM_JSON:
                    replaced = True
                    problem = body_too_large(self.max_bytes)
                    await send(
                        {
                            "type": "http.response.start",
                            "status": 413,
                            "headers": problem.raw_headers,
                        }
                    )
                    await send({"type": "http.response.body", "body": problem.body})
                    return
            if replaced:
                return  # the rest of the framework's plain-text answer
            await send(message)

        await self.app(scope, receive, send_problem)


class LimitedApp(FastAPI):
    """FastAPI with its `max_body_size` (required here), and every 413 a problem: the stack the
    framework builds, `ProblemsFor413` around it (outermost, where the framework's own 413
    goes out)."""

    def __init__(self, *, max_body_size: int, **kwargs: Any) -> None:
        super().__init__(max_body_size=max_body_size, **kwargs)
        self.body_limit = max_body_size

    def build_middleware_stack(self) -> ASGIApp:
        return ProblemsFor413(super().build_middleware_stack(), self.body_limit)
