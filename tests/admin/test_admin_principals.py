"""Named principals: every token is a principal (PACELINE_ADMIN_TOKEN's is `admin`,
PACELINE_ADMIN_TOKENS names others); what a request does is recorded with its principal's name,
whatever a header says; the settings refuse what is ambiguous; no token is ever logged or echoed.

The API tests run a second app, with named tokens, on the session's database and namespace."""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import sys
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from admin_support import (
    HEARTBEAT_S,
    TOKEN,
    assert_problem,
    body_of,
    create_definition,
    done,
    drain,
    flagged,
    insert_instance,
    insert_server,
    running,
    unique,
)
from aio_pika.abc import AbstractChannel, AbstractQueue
from fastapi import FastAPI
from pydantic import SecretStr, ValidationError

from paceline_admin import principals as principals_module
from paceline_admin.app import create_app
from paceline_admin.principals import NamedToken, Principals, parse_groups, parse_tokens
from paceline_admin.settings import AdminSettings
from paceline_contracts.messages import DRAIN
from paceline_contracts.queues import control_exchange_name, control_queue_name
from paceline_contracts.states import InstanceStatus
from paceline_infra.lifecycle import settings_problems

ALICE = "alice-token-" + secrets.token_hex(16)
BOB = "bob-token-" + secrets.token_hex(16)
SECRETS = (TOKEN, ALICE, BOB)
SPOOF = {"X-Paceline-Operator": "mallory", "X-Paceline-Started-By": "mallory"}
"""Headers that once named who asked: they must not override the token's principal."""
STEPS = {"steps": [{"id": "probe", "type": "noop"}, {"id": "push", "type": "noop"}]}
COMMAND = Path(sys.executable).parent / "paceline-admin"
SETTINGS_ENV = ("PACELINE_ADMIN_TOKEN", "PACELINE_ADMIN_TOKENS", "PACELINE_GROUPS")


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture(scope="module")
async def named_app(
    settings: AdminSettings, broker: AbstractChannel, app: FastAPI
) -> AsyncIterator[FastAPI]:
    """An admin app whose principals are admin (the session's token), alice and bob."""
    named = AdminSettings(
        database_url=settings.database_url,
        namespace=settings.namespace,
        amqp_url=settings.amqp_url,
        admin_token=TOKEN,
        admin_tokens=f"alice={ALICE}, bob={BOB}",
        groups="netops=alice,bob; leads=alice",
        server_heartbeat_s=HEARTBEAT_S,
    )
    application = create_app(named)
    async with application.router.lifespan_context(application):
        yield application


@pytest.fixture(scope="module")
async def clients(named_app: FastAPI) -> AsyncIterator[dict[str, httpx.AsyncClient]]:
    """A client of the named app for each principal, by name."""
    transport = httpx.ASGITransport(app=named_app)
    made = {
        name: httpx.AsyncClient(transport=transport, base_url="http://admin", headers=bearer(t))
        for name, t in (("admin", TOKEN), ("alice", ALICE), ("bob", BOB))
    }
    yield made
    for client in made.values():
        await client.aclose()


@pytest.fixture(scope="module")
async def nobody(named_app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=named_app)
    async with httpx.AsyncClient(transport=transport, base_url="http://admin") as client:
        yield client


def assert_no_secret(*texts: str) -> None:
    for text in texts:
        for token in SECRETS:
            assert token not in text


def shown(response: httpx.Response) -> str:
    """All a caller sees of a response."""
    return response.text + "".join(f"{k}: {v}\n" for k, v in response.headers.items())


# --- the API records the principal ----------------------------------------------------------


@pytest.mark.parametrize("who", ["admin", "alice", "bob"])
async def test_a_start_is_started_by_the_token_s_principal(
    clients: dict[str, httpx.AsyncClient], pool: asyncpg.Pool, commands: AbstractQueue, who: str
) -> None:
    name = unique("principal")
    await create_definition(clients[who], name, STEPS)
    response = await clients[who].post(
        "/v1/instances", json={"definition": name, "inputs": {}}, headers=SPOOF
    )
    assert response.status_code == 202, response.text
    instance_id = uuid.UUID(response.json()["id"])
    row = await pool.fetchrow("SELECT started_by FROM instances WHERE id = $1", instance_id)
    assert row["started_by"] == who
    detail = await clients["bob"].get(f"/v1/instances/{instance_id}")
    assert detail.json()["started_by"] == who
    await drain(commands)  # the start command (the scheduler reads `started_by` from the row)


async def test_a_cancel_is_by_the_token_s_principal(
    clients: dict[str, httpx.AsyncClient], pool: asyncpg.Pool, commands: AbstractQueue
) -> None:
    name = unique("principal")
    await create_definition(clients["bob"], name, STEPS)
    instance_id, _ = await insert_instance(
        pool, name, {"probe": done(), "push": running("worker-3")}, InstanceStatus.RUNNING
    )
    response = await clients["bob"].post(
        f"/v1/instances/{instance_id}/cancel", json={"reason": "wrong host"}, headers=SPOOF
    )
    assert response.status_code == 202, response.text
    assert response.json()["cancel"]["by"] == "bob"
    by = await pool.fetchval(
        "SELECT by FROM cancel_requests WHERE instance_id = $1", uuid.UUID(instance_id)
    )
    assert by == "bob"
    [message] = await drain(commands)
    assert (body_of(message)["type"], body_of(message)["by"]) == ("instance.cancel", "bob")
    # Asked again by someone else: answered as the first cancel was, by bob.
    again = await clients["alice"].post(f"/v1/instances/{instance_id}/cancel")
    assert again.json()["cancel"]["by"] == "bob"


async def test_a_resolve_is_by_the_token_s_principal(
    clients: dict[str, httpx.AsyncClient], pool: asyncpg.Pool, commands: AbstractQueue
) -> None:
    name = unique("principal")
    await create_definition(clients["alice"], name, STEPS)
    instance_id, _ = await insert_instance(
        pool, name, {"probe": done(), "push": flagged(datetime.now(UTC), server="gone-9")}
    )
    response = await clients["alice"].post(
        f"/v1/instances/{instance_id}/activities/push/resolve",
        json={"action": "skip", "output": {"ok": True}},
        headers=SPOOF,
    )
    assert response.status_code == 202, response.text
    by = await pool.fetchval(
        "SELECT by FROM resolve_requests WHERE instance_id = $1", uuid.UUID(instance_id)
    )
    assert by == "alice"
    [message] = await drain(commands)
    assert (body_of(message)["type"], body_of(message)["by"]) == ("activity.resolve", "alice")


async def test_a_drain_is_by_the_token_s_principal(
    clients: dict[str, httpx.AsyncClient],
    pool: asyncpg.Pool,
    broker: AbstractChannel,
    namespace: str,
) -> None:
    server = await insert_server(pool)
    exchange = await broker.get_exchange(control_exchange_name(namespace))
    queue = await broker.declare_queue(
        control_queue_name(namespace, server), exclusive=True, auto_delete=True
    )
    await queue.bind(exchange, routing_key=server)
    try:
        response = await clients["bob"].post(f"/v1/servers/{server}/drain", headers=SPOOF)
        assert response.status_code == 202, response.text
        [message] = await drain(queue)
        assert DRAIN.validate_json(message.body).by == "bob"
    finally:
        await queue.delete(if_unused=False, if_empty=False)
        await pool.execute("DELETE FROM servers WHERE id = $1", server)


@pytest.mark.parametrize(
    "authorization",
    [
        None,
        f"Bearer {ALICE[:-1]}",  # a prefix
        f"Bearer {ALICE}x",
        f"Bearer {ALICE.upper()}",
        f"Bearer alice={ALICE}",
        "Bearer alice",  # a name is not a token
        f"Basic {BOB}",
        f"Bearer {ALICE},{BOB}",
    ],
    ids=["none", "prefix", "longer", "upper", "pair", "name", "basic", "two"],
)
async def test_a_wrong_token_is_401(nobody: httpx.AsyncClient, authorization: str | None) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    for method, path in (("GET", "/v1/definitions"), ("POST", "/v1/instances")):
        response = await nobody.request(method, path, headers=headers, json={"definition": "x"})
        problem = assert_problem(response, 401)
        assert problem["type"].endswith("unauthorized")
        assert_no_secret(shown(response))


async def test_named_tokens_are_this_app_s_only(
    client: httpx.AsyncClient, clients: dict[str, httpx.AsyncClient]
) -> None:
    # The session's app has only the admin token: alice's means nothing there.
    assert_problem(await client.get("/v1/definitions", headers=bearer(ALICE)), 401)
    for named in clients.values():
        assert (await named.get("/v1/definitions")).status_code == 200


async def test_a_malformed_body_is_checked_after_the_named_token(
    clients: dict[str, httpx.AsyncClient], nobody: httpx.AsyncClient
) -> None:
    json = {"Content-Type": "application/json"}
    assert_problem(await clients["bob"].post("/v1/instances", content=b"{not", headers=json), 400)
    response = await nobody.post(
        "/v1/instances",
        content=b"{not json",
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {BOB}0"},
    )
    assert_problem(response, 401)


async def test_no_token_is_logged_or_echoed(
    clients: dict[str, httpx.AsyncClient],
    nobody: httpx.AsyncClient,
    pool: asyncpg.Pool,
    commands: AbstractQueue,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    name = unique("principal")
    responses = [await create_definition_response(clients["alice"], name)]
    start = await clients["alice"].post("/v1/instances", json={"definition": name, "inputs": {}})
    responses.append(start)
    instance_id = start.json()["id"]
    responses.append(await clients["bob"].post(f"/v1/instances/{instance_id}/cancel"))
    flagged_id, _ = await insert_instance(
        pool, name, {"probe": done(), "push": flagged(datetime.now(UTC), server="gone-8")}
    )
    responses.append(
        await clients["alice"].post(
            f"/v1/instances/{flagged_id}/activities/push/resolve", json={"action": "fail"}
        )
    )
    for token in SECRETS:
        for wrong in (token[:-1], token + "0", f"{token} {token}"):
            responses.append(await nobody.get("/v1/flags", headers=bearer(wrong)))
    assert [r.status_code for r in responses[:4]] == [201, 202, 202, 202]
    assert {r.status_code for r in responses[4:]} == {401}
    # The log names who cancelled (so the check below reads what the requests logged).
    assert any("requested by bob" in r.getMessage() for r in caplog.records)
    assert_no_secret(caplog.text, *(shown(r) for r in responses))
    await drain(commands)


async def create_definition_response(client: httpx.AsyncClient, name: str) -> httpx.Response:
    return await client.post("/v1/definitions", json={"name": name, **STEPS})


# --- the settings ---------------------------------------------------------------------------


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No principals in the environment, but those a test sets."""
    for name in SETTINGS_ENV:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def problems_with(env: pytest.MonkeyPatch, **settings: str) -> list[str]:
    for name, value in settings.items():
        env.setenv(f"PACELINE_{name.upper()}", value)
    found = settings_problems(AdminSettings)
    assert_no_secret(*found)
    return found


def test_settings_need_a_token(env: pytest.MonkeyPatch) -> None:
    [problem] = problems_with(env)
    assert problem.startswith("PACELINE_ADMIN_TOKENS: no token is given")
    assert "set PACELINE_ADMIN_TOKEN (the principal `admin`), PACELINE_ADMIN_TOKENS" in problem
    assert problems_with(env, admin_tokens=" , ") == [problem]  # nothing in it


def test_either_setting_alone_is_enough(env: pytest.MonkeyPatch) -> None:
    env.setenv("PACELINE_ADMIN_TOKEN", TOKEN)
    assert AdminSettings().principals.names == {"admin"}
    env.delenv("PACELINE_ADMIN_TOKEN")
    env.setenv("PACELINE_ADMIN_TOKENS", f"alice={ALICE},bob={BOB},")
    found = AdminSettings().principals
    assert found.names == {"alice", "bob"}
    assert (found.authenticate(ALICE), found.authenticate(BOB)) == ("alice", "bob")
    assert found.authenticate(TOKEN) is None


def test_tokens_keep_the_minimum_length(env: pytest.MonkeyPatch) -> None:
    short = "s3cr3t-but-short"[:15]
    assert problems_with(env, admin_token=short) == [
        "PACELINE_ADMIN_TOKEN: use at least 16 characters"
    ]
    env.delenv("PACELINE_ADMIN_TOKEN")
    [problem] = problems_with(env, admin_tokens=f"alice={ALICE},bob={short}")
    assert problem == "PACELINE_ADMIN_TOKENS: item 2: the token is shorter than 16 characters"
    assert short not in problem


@pytest.mark.parametrize(
    ("tokens", "expected"),
    [
        (f"alice={ALICE},alice={BOB}", "the name alice is given twice (item 1, item 2)"),
        (f"alice={ALICE},bob={ALICE}", "item 1 and item 2 have the same token"),
        (f"admin={ALICE}", "the name admin is given twice (PACELINE_ADMIN_TOKEN, item 1)"),
        (f"bob={TOKEN}", "PACELINE_ADMIN_TOKEN and item 1 have the same token"),
    ],
    ids=["name", "token", "admin-name", "admin-token"],
)
def test_a_name_or_a_token_given_twice_is_refused(
    env: pytest.MonkeyPatch, tokens: str, expected: str
) -> None:
    assert problems_with(env, admin_token=TOKEN, admin_tokens=tokens) == [
        f"PACELINE_ADMIN_TOKENS: {expected}"
    ]


BAD_NAME = (
    "the name is not 1 to 64 letters, digits, `_`, `.`, `-` or `@`, starting with a letter or "
    "a digit"
)


@pytest.mark.parametrize(
    ("item", "expected"),
    [
        (f"al ice={ALICE}", BAD_NAME),
        (f"group:ops={ALICE}", BAD_NAME),
        (f"-lead={ALICE}", BAD_NAME),
        (f"al;ice={ALICE}", BAD_NAME),
        (f"élise={ALICE}", BAD_NAME),
        (f"{'a' * 65}={ALICE}", BAD_NAME),
        (f"={ALICE}", "the name is empty"),
        (ALICE, "not `name=token`"),  # the token alone, where a pair should be
        (f"{ALICE}=alice", "the token is shorter than 16 characters"),  # reversed
        ("alice=alice-token-012345678 9", "the token holds whitespace or a control character"),
    ],
    ids=[
        "space", "group-prefix", "dash-first", "semicolon", "not-ascii", "long", "empty", "bare",
        "reversed", "token-with-space",
    ],
)  # fmt: skip
def test_a_bad_entry_is_refused_by_its_place(
    env: pytest.MonkeyPatch, item: str, expected: str
) -> None:
    # By its place only: the text of a malformed entry may be a token.
    assert problems_with(env, admin_tokens=f"bob={BOB},{item}") == [
        f"PACELINE_ADMIN_TOKENS: item 2: {expected}"
    ]


def test_tokens_from_a_file(env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    carol = "carol-" + secrets.token_hex(12) + "=with=equals@and,comma"
    tokens.write_text(f"# who may call\n\nalice = {ALICE}\n  carol={carol}\n")
    env.setenv("PACELINE_ADMIN_TOKENS", f"bob={BOB},@{tokens}")
    found = AdminSettings().principals
    assert found.names == {"alice", "bob", "carol"}
    assert [found.authenticate(t) for t in (ALICE, BOB, carol)] == ["alice", "bob", "carol"]

    tokens.write_text(f"alice={ALICE}\nbob {BOB}\nshort=tiny-token\n")
    [problem] = problems_with(env, admin_tokens=f"@{tokens}")
    assert problem == (
        f"PACELINE_ADMIN_TOKENS: line 2 of {tokens}: not `name=token`; line 3 of {tokens}: "
        "the token is shorter than 16 characters"
    )
    tokens.write_text(f"alice={ALICE}\n")
    [problem] = problems_with(env, admin_tokens=f"alice={BOB},@{tokens}")
    assert problem.endswith(f"the name alice is given twice (item 1, line 1 of {tokens})")


def test_a_tokens_file_that_cannot_be_read_is_refused(
    env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    missing = tmp_path / "nothing-here"
    assert problems_with(env, admin_tokens=f"@{missing}") == [
        f"PACELINE_ADMIN_TOKENS: cannot read the tokens file {missing}: No such file or directory"
    ]
    assert problems_with(env, admin_tokens="@") == [
        "PACELINE_ADMIN_TOKENS: `@` must be followed by the path of a file of `name=token` lines"
    ]


@pytest.mark.parametrize(
    ("groups", "expected"),
    [
        ("netops=alice,carol", "group netops: carol is not a principal"),
        ("netops=", "the group netops has no members"),
        ("netops=alice;netops=bob", "the group netops is given twice"),
        ("netops=alice,alice", "group netops: alice is listed twice"),
        ("group:ops=alice", "group: the name 'group:ops' is not 1 to 64"),
        ("netops=group:leads", "group netops: the name 'group:leads' is not 1 to 64"),
        ("netops alice", "'netops alice' is not `group=name,name`"),
    ],
    ids=["unknown", "empty", "twice", "member-twice", "prefix", "nested", "no-equals"],
)
def test_bad_groups_are_refused(env: pytest.MonkeyPatch, groups: str, expected: str) -> None:
    [problem] = problems_with(env, admin_tokens=f"alice={ALICE},bob={BOB}", groups=groups)
    assert problem.startswith(f"PACELINE_GROUPS: {expected}"), problem


def test_settings_errors_never_show_a_token(env: pytest.MonkeyPatch) -> None:
    # Neither the messages (`paceline-admin run` prints them) nor the error's own text (a
    # traceback would show it) hold a value given.
    short = ALICE[:15]
    with pytest.raises(ValidationError) as caught:
        AdminSettings(admin_token=short, admin_tokens=f"{BOB}=bob,x={short},{TOKEN}")
    text = str(caught.value) + "".join(str(e["msg"]) for e in caught.value.errors())
    assert "item 1: the token is shorter" in text
    assert_no_secret(text)
    assert short not in text
    settings = AdminSettings(admin_token=TOKEN, admin_tokens=f"alice={ALICE}")
    assert_no_secret(repr(settings), str(settings), repr(settings.principals))


async def test_check_prints_every_problem_without_a_token(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in SETTINGS_ENV}
    env["PACELINE_ADMIN_TOKEN"] = ALICE[:15]
    env["PACELINE_ADMIN_TOKENS"] = f"bob={BOB},bob={TOKEN}"
    env["PACELINE_GROUPS"] = "ops=bob"
    process = await asyncio.create_subprocess_exec(
        str(COMMAND), "check", env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await process.communicate()
    assert process.returncode == 2
    text = (out + err).decode()
    assert "PACELINE_ADMIN_TOKEN: use at least 16 characters" in text
    assert "PACELINE_ADMIN_TOKENS: the name bob is given twice (item 1, item 2)" in text
    assert_no_secret(text)
    assert ALICE[:15] not in text


# --- Principals and groups ------------------------------------------------------------------


def named(*pairs: tuple[str, str]) -> list[NamedToken]:
    return [NamedToken(n, SecretStr(t), f"item {i}") for i, (n, t) in enumerate(pairs, 1)]


PEOPLE = named(("alice", ALICE), ("bob", BOB), ("carol", TOKEN))
GROUPS = parse_groups(" netops = alice , bob ; leads=carol;oncall=bob;")


def test_groups_parse() -> None:
    assert GROUPS == {"netops": ("alice", "bob"), "leads": ("carol",), "oncall": ("bob",)}
    assert parse_groups("") == {}


def test_members_and_groups_of() -> None:
    found = Principals(PEOPLE, GROUPS)
    assert found.groups == {"netops", "leads", "oncall"}
    assert found.members("netops") == {"alice", "bob"}
    assert found.members("group:netops") == {"alice", "bob"}
    assert found.members("nobody") == frozenset()
    assert found.groups_of("bob") == {"netops", "oncall"}
    assert found.groups_of("carol") == {"leads"}
    assert found.groups_of("dave") == frozenset()


@pytest.mark.parametrize(
    ("name", "who", "expected"),
    [
        ("alice", "group:netops", True),
        ("bob", "group:netops", True),
        ("carol", "group:netops", False),
        ("carol", "group:leads", True),
        ("alice", "group:nobody", False),
        ("alice", "alice", True),
        ("alice", "bob", False),
        ("alice", "netops", False),  # a bare name is a principal, never a group
        ("dave", "dave", False),  # not a principal
        ("alice", "group:", False),
    ],
)
def test_is_member(name: str, who: str, expected: bool) -> None:
    assert Principals(PEOPLE, GROUPS).is_member(name, who) is expected


def test_knows_names_and_groups() -> None:
    found = Principals(PEOPLE, GROUPS)
    assert [found.knows(w) for w in ("alice", "group:leads", "leads", "group:x", "dave")] == [
        True,
        True,
        False,
        False,
        False,
    ]


def test_principals_refuse_conflicts_and_unknown_members() -> None:
    with pytest.raises(ValueError, match="there is no principal"):
        Principals([])
    with pytest.raises(ValueError, match=r"item 1 and item 2 have the same token"):
        Principals(named(("alice", ALICE), ("bob", ALICE)))
    with pytest.raises(ValueError, match=r"group leads: dave is not a principal"):
        Principals(PEOPLE, {"leads": ("carol", "dave")})
    with pytest.raises(ValueError) as caught:
        parse_tokens(f"alice={ALICE},alice={BOB},x=short")
    assert str(caught.value) == (
        "item 3: the token is shorter than 16 characters; "
        "the name alice is given twice (item 1, item 2)"
    )


def test_authenticate() -> None:
    found = Principals(PEOPLE)
    assert [found.authenticate(t) for t in (ALICE, BOB, TOKEN)] == ["alice", "bob", "carol"]
    for wrong in (None, "", ALICE[:-1], ALICE + " ", "alice", "t\xf6ken", "\udcff"):
        assert found.authenticate(wrong) is None
    assert_no_secret(repr(found))


# Fixed ids: the tokens are random per process, and parallel workers must collect the same tests.
@pytest.mark.parametrize(
    "given", [ALICE, TOKEN, "x", "y" * 10_000], ids=["first", "last", "short", "long"]
)
def test_authenticate_compares_with_every_token_in_constant_time(
    monkeypatch: pytest.MonkeyPatch, given: str
) -> None:
    # Every configured token is compared, whichever matches (the first, the last, none), and
    # always as two values of one length, so neither the given token's length nor which
    # principal it is shows in the time taken.
    compared: list[tuple[int, int]] = []
    real = principals_module.hmac.compare_digest

    def counting(a: Any, b: Any) -> bool:
        compared.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(principals_module.hmac, "compare_digest", counting)
    Principals(PEOPLE).authenticate(given)
    assert compared == [(32, 32)] * len(PEOPLE)
