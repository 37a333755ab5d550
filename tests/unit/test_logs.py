"""The services' log set-up: nothing in a log line carries a secret from a request's URL."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import httpx
import pytest

from paceline_infra.logs import setup_logging

SECRET = "s3cret-marker-4711"


@pytest.fixture
def service_logging() -> Iterator[None]:
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    levels = {n: logging.getLogger(n).level for n in ("httpx", "httpcore")}
    yield
    root.handlers[:], root.level = saved
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


async def test_a_request_url_with_secrets_is_not_logged(
    service_logging: None, capsys: pytest.CaptureFixture[str]
) -> None:
    setup_logging("activity-worker-test", "DEBUG")
    transport = httpx.MockTransport(lambda request: httpx.Response(200))
    async with httpx.AsyncClient(transport=transport) as client:
        await client.get(f"https://ops:{SECRET}@device.invalid/api?token={SECRET}")
    logging.getLogger("paceline").info("a line of our own")  # the handler does write
    err = capsys.readouterr().err
    assert "a line of our own" in err
    assert SECRET not in err
