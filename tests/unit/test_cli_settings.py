"""What the CLI shows of the API's URL in its messages: never credentials, never a query."""

from __future__ import annotations

import pytest

from paceline_cli.settings import shown_url


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("http://127.0.0.1:8080", "http://127.0.0.1:8080"),
        ("https://ops:s3cret@api.example:8443/base", "https://api.example:8443/base"),
        ("http://api.example/?token=s3cret", "http://api.example/"),
        ("http://u@api.example:80/p?x=1#frag", "http://api.example:80/p"),
    ],
)
def test_a_shown_url_has_no_credentials_and_no_query(url: str, shown: str) -> None:
    assert shown_url(url) == shown
