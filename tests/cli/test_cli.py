"""The `paceline` CLI (docs/cli.md), run as a subprocess against a real stack: what it shows,
that `--format json` is the API's own JSON, and its exit codes (0 ok, 1 the API refused,
2 usage, 3 unreachable, 4 FAILED or CANCELLED and 5 FLAGGED for `start --wait`).

One file, so that `make test` (files spread over workers) starts one stack for all of it."""

from __future__ import annotations

import json
import re
import socket
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from cli.conftest import Ran, Run, wait_until

pytestmark = pytest.mark.integration

HELLO_YAML = """\
name: hello
inputs:
  who: {type: string}
  count: {type: integer, default: 1}
steps:
  - id: greet
    type: shell.command
    with: {argv: ["echo", "hello ${inputs.who}"]}
  - id: both
    parallel:
      - [{id: nap, type: sleep, with: {seconds: 0.2}}]
      - [{id: echo, type: noop, with: {who: "${inputs.who}", n: "${inputs.count}"}}]
"""
BOOM = {
    "name": "boom",
    "steps": [{"id": "fail", "type": "shell.command", "with": {"argv": ["sh", "-c", "exit 3"]}}],
}
NAP = {"name": "nap", "steps": [{"id": "nap", "type": "sleep", "with": {"seconds": 120}}]}
# Killed by a signal: its outcome is unknown, and shell.command is not restartable: flagged.
FLAGME = {
    "name": "flagme",
    "steps": [
        {"id": "run", "type": "shell.command", "with": {"argv": ["sh", "-c", "kill -KILL $$"]}},
        {"id": "after", "type": "noop", "with": {"code": "${steps.run.output.exit_code}"}},
    ],
}
GATE = {
    "name": "gate",
    "steps": [
        {"id": "ready", "wait": {"signal": "go", "timeout": "10m"}},
        {"id": "done", "type": "noop", "with": {"ok": "${steps.ready.output}"}},
    ],
}
BAD_YAML = """\
name: bad
steps:
  - id: a
    type: nosuch
  - id: a
    type: sleep
    with: {seconds: "x"}
"""


@pytest.fixture(scope="module")
def defs(paceline: Run, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The test definitions, applied through the CLI (YAML and JSON files)."""
    folder = tmp_path_factory.mktemp("defs")
    (folder / "hello.yaml").write_text(HELLO_YAML)
    for d in (BOOM, NAP, FLAGME, GATE):
        (folder / f"{d['name']}.json").write_text(json.dumps(d))
    for name in ("hello.yaml", "boom.json", "nap.json", "flagme.json", "gate.json"):
        ran = paceline("definitions", "apply", str(folder / name))
        assert ran.code == 0, ran
    return folder


def ok(ran: Ran) -> Ran:
    assert ran.code == 0, f"exit {ran.code}\nstdout: {ran.out}\nstderr: {ran.err}"
    return ran


def instance(api: httpx.Client, instance_id: str) -> dict[str, Any]:
    return api.get(f"/v1/instances/{instance_id}").json()


def wait_status(api: httpx.Client, instance_id: str, *statuses: str) -> dict[str, Any]:
    def reached() -> dict[str, Any] | None:
        body = instance(api, instance_id)
        return body if body["status"] in statuses else None

    return wait_until(reached, 60, f"{instance_id} to be {statuses}")


def start_api(api: httpx.Client, name: str, inputs: dict[str, Any] | None = None) -> str:
    r = api.post("/v1/instances", json={"definition": name, "inputs": inputs or {}})
    assert r.status_code == 202, r.text
    return str(r.json()["id"])


def lines_with(text: str, *words: str) -> list[str]:
    return [line for line in text.splitlines() if all(w in line for w in words)]


# --- definitions ---------------------------------------------------------------------------


def test_apply_yaml_and_json_definitions_and_read_them_back(
    paceline: Run, api: httpx.Client, defs: Path
) -> None:
    # A second version, from YAML on stdin; the answer is the API's JSON.
    created = ok(paceline("definitions", "apply", "-", "-o", "json", stdin=HELLO_YAML)).json()
    assert created["name"] == "hello" and created["version"] == 2
    assert created == api.get("/v1/definitions/hello/versions/2").json()
    assert created["definition"]["steps"][0]["with"]["argv"] == ["echo", "hello ${inputs.who}"]

    table = ok(paceline("definitions", "apply", str(defs / "boom.json"))).out
    assert "boom version 2" in table

    listed = ok(paceline("definitions", "list", "-o", "json")).json()
    assert listed == api.get("/v1/definitions", params={"limit": 500}).json()
    assert {d["name"] for d in listed["items"]} == {"hello", "boom", "nap", "flagme", "gate"}
    lines = ok(paceline("definitions", "list", "-o", "jsonl")).out.splitlines()
    assert [json.loads(line) for line in lines] == listed["items"]
    table = ok(paceline("definitions", "list")).out
    (hello_row,) = lines_with(table, "hello")
    assert hello_row.split()[:3] == ["hello", "2", "2"], hello_row

    shown = ok(paceline("definitions", "show", "hello", "-o", "json")).json()
    assert shown == api.get("/v1/definitions/hello").json()
    table = ok(paceline("definitions", "show", "hello")).out
    assert "latest" in table and "# version 2" in table
    assert "hello ${inputs.who}" in table, "the latest version's definition is shown as YAML"
    one = ok(paceline("definitions", "show", "boom", "--version", "1", "-o", "json")).json()
    assert one == api.get("/v1/definitions/boom/versions/1").json()


def test_a_malformed_definition_is_refused_with_every_problem(
    paceline: Run, api: httpx.Client, tmp_path: Path
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(BAD_YAML)
    ran = paceline("definitions", "apply", str(bad))
    assert ran.code == 1, ran
    assert ran.out == ""
    first, *listed = ran.err.splitlines()
    assert first.startswith("paceline: Invalid definition (422)"), ran.err
    problem = api.post(
        "/v1/definitions", content=BAD_YAML, headers={"Content-Type": "application/yaml"}
    ).json()
    expected = [f"  - {e['path']}: {e['message']}" for e in problem["errors"]]
    assert len(expected) == 3
    assert listed == expected
    assert "Traceback" not in ran.err

    # Not YAML at all: the API's own 400, readable.
    junk = tmp_path / "junk.yaml"
    junk.write_text("name: [unclosed\n")
    ran = paceline("definitions", "apply", str(junk))
    assert ran.code == 1 and "(400)" in ran.err, ran


# --- start ---------------------------------------------------------------------------------


def test_start_wait_completes_with_progress_and_typed_inputs(
    paceline: Run, api: httpx.Client, defs: Path
) -> None:
    ran = ok(paceline("start", "hello", "-i", "who=world", "-i", "count=3", "--wait"))
    assert lines_with(ran.out, "status", "COMPLETED"), ran.out
    for step in ("greet", "nap", "echo"):
        assert lines_with(ran.out, step, "COMPLETED"), (step, ran.out)
    # Progress on stderr, one line per change (stderr is not a terminal here).
    assert lines_with(ran.err, "greet (shell.command): COMPLETED"), ran.err
    assert lines_with(ran.err, ": COMPLETED"), ran.err

    # json: the instance as the API shows it, once final; count=3 went as an integer.
    ran = ok(
        paceline("start", "hello", "-i", "who=json", "-i", "count=3", "-w", "-q", "-o", "json")
    )
    body = ran.json()
    assert body["status"] == "COMPLETED"
    assert body == instance(api, body["id"])
    assert body["inputs"] == {"who": "json", "count": 3}
    assert body["outputs"]["greet"]["stdout"] == "hello json\n"
    assert ran.err == "", "--quiet shows no progress"


def test_start_wait_on_a_failing_process_exits_4(paceline: Run, defs: Path) -> None:
    ran = paceline("start", "boom", "--wait")
    assert ran.code == 4, ran
    assert lines_with(ran.out, "status", "FAILED"), ran.out
    assert lines_with(ran.out, "fail", "FAILED", "exited with code 3"), ran.out
    assert "ended FAILED" in ran.err


def test_start_without_wait_and_idempotency_key(
    paceline: Run, api: httpx.Client, defs: Path, tmp_path: Path
) -> None:
    inputs = tmp_path / "inputs.yaml"
    inputs.write_text("who: file\ncount: 2\n")
    key = f"cli-test-{uuid.uuid4()}"
    argv = ("start", "hello", "--inputs-file", str(inputs), "-i", "count:=5", "-k", key)
    first = ok(paceline(*argv, "-o", "json")).json()
    assert set(first) >= {"id", "status", "definition", "version"}
    again = ok(paceline(*argv, "-o", "json"))
    assert again.json()["id"] == first["id"], "the same key starts nothing new"
    assert "used before" in again.err
    assert instance(api, first["id"])["inputs"] == {"who": "file", "count": 5}

    ran = paceline("start", "hello", "-i", "who=other", "-k", key)
    assert ran.code == 1 and "(422)" in ran.err, ran

    ran = paceline("start", "hello", "-i", "count=x", "-i", "nope=1")
    assert ran.code == 1, ran
    assert "paceline: Invalid inputs (422)" in ran.err
    assert "  - inputs.who: required" in ran.err.splitlines()
    assert lines_with(ran.err, "inputs.nope")


# --- instances -----------------------------------------------------------------------------


def test_instances_list_filters_and_follows_pages(
    paceline: Run, api: httpx.Client, defs: Path
) -> None:
    done = start_api(api, "hello", {"who": "list"})
    failed = start_api(api, "boom")
    wait_status(api, done, "COMPLETED")
    wait_status(api, failed, "FAILED")

    body = ok(paceline("instances", "list", "--status", "FAILED", "-o", "json")).json()
    assert body == api.get("/v1/instances", params={"status": "FAILED", "limit": 50}).json()
    assert {i["status"] for i in body["items"]} == {"FAILED"}
    assert failed in {i["id"] for i in body["items"]}

    table = ok(paceline("instances", "list", "-s", "completed", "-d", "hello")).out
    assert lines_with(table, done, "hello v", "COMPLETED")
    assert failed not in table

    # --limit over several pages (of 1): the first 3, as the API orders them.
    newest = [i["id"] for i in api.get("/v1/instances", params={"limit": 3}).json()["items"]]
    paged = ok(paceline("instances", "list", "--limit", "3", "--page-size", "1", "-o", "json"))
    assert [i["id"] for i in paged.json()["items"]] == newest
    assert paged.json()["next_cursor"], "more instances are left"
    assert "more" in ok(paceline("instances", "list", "--limit", "1")).err

    ran = paceline("instances", "list", "--status", "SNOOZING")
    assert ran.code == 1 and "query.status" in ran.err, ran


def test_describe_and_history(paceline: Run, api: httpx.Client, defs: Path) -> None:
    instance_id = start_api(api, "hello", {"who": "describe"})
    final = wait_status(api, instance_id, "COMPLETED")

    table = ok(paceline("describe", instance_id)).out
    assert lines_with(table, "status", "COMPLETED")
    for a in final["activities"]:
        (row,) = lines_with(table, f" {a['step']} ", a["type"], "COMPLETED")
        assert a["server"] in row
    (greet,) = lines_with(table, " greet ")
    assert "output: {" in greet and '"stdout": "hello describe' in greet, greet
    assert ok(paceline("instances", "describe", instance_id, "-o", "json")).json() == final

    history = api.get(f"/v1/instances/{instance_id}/history").json()
    lines = ok(paceline("history", instance_id, "-o", "jsonl")).out.splitlines()
    assert [json.loads(line) for line in lines] == history["items"]
    table = ok(paceline("instances", "history", instance_id)).out
    kinds = [m.group(1) for m in re.finditer(r"^ ?\d{4}-\d\d-\d\d \S+\s+(\S+)", table, re.M)]
    assert kinds == [h["kind"] for h in history["items"]]
    assert "instance_completed" in kinds


def test_cancel_a_long_sleep_and_why_says_who_runs_it(
    paceline: Run, api: httpx.Client, defs: Path
) -> None:
    instance_id = ok(paceline("start", "nap", "-o", "json")).json()["id"]

    def running() -> dict[str, Any] | None:
        body = instance(api, instance_id)
        acts = body["activities"]
        return body if acts and acts[0]["status"] == "RUNNING" and acts[0]["server"] else None

    server = wait_until(running, 30, "the sleep to run")["activities"][0]["server"]
    words = ok(paceline("why", instance_id)).out
    assert "is RUNNING since" in words.splitlines()[0]
    (held,) = lines_with(words, "step nap (sleep), attempt 1: running since", server)
    assert "ACTIVE, last heartbeat" in held
    assert f"paceline cancel {instance_id}" in words

    ran = ok(paceline("cancel", instance_id, "--reason", "cli test"))
    assert lines_with(ran.out, "reason", "cli test")
    assert lines_with(ran.out, "status", "CANCEL")
    wait_status(api, instance_id, "CANCELLED")
    words = ok(paceline("instances", "why", instance_id)).out
    assert "is CANCELLED since" in words
    assert "by admin: cli test" in words
    assert lines_with(words, "step nap (sleep) CANCELLED")

    # Ended: a second cancel is answered as the first (202), so is a resolve refused (409).
    ran = paceline("resolve", instance_id, "nap", "skip")
    assert ran.code == 1 and "(409)" in ran.err, ran


def test_a_flag_is_listed_explained_and_resolved(
    paceline: Run, api: httpx.Client, defs: Path
) -> None:
    ran = paceline("start", "flagme", "--wait", "-o", "json")
    assert ran.code == 5, ran
    instance_id = ran.json()["id"]
    assert ran.json()["status"] == "FLAGGED"
    assert f"paceline why {instance_id}" in ran.err

    flags = ok(paceline("flags", "-o", "json")).json()
    # What the API says of the holder now (its last heartbeat, ...) moves between two reads.
    assert _without_live(flags) == _without_live(api.get("/v1/flags", params={"limit": 500}).json())
    (flag,) = [f for f in flags["items"] if f["instance_id"] == instance_id]
    assert flag["step"] == "run" and flag["flag"]["kind"] == "outcome_unknown"
    table = ok(paceline("flags")).out
    assert lines_with(table, instance_id, "flagme v1", "run", "shell.command", "outcome_unknown")

    words = ok(paceline("why", instance_id)).out
    assert "is FLAGGED since" in words.splitlines()[0]
    assert lines_with(words, "step run (shell.command", "flagged outcome_unknown")
    assert lines_with(words, "Why:", "SIGKILL")
    for action in ("retry", "skip", "fail"):
        assert f"paceline resolve {instance_id} run {action}" in words, words
    explained = ok(paceline("why", instance_id, "-o", "json")).json()
    assert explained["status"] == "FLAGGED"
    assert f"paceline resolve {instance_id} run fail" in [
        a["command"] for a in explained["actions"]
    ]

    # Usage errors are caught before anything is sent.
    ran = paceline("resolve", instance_id, "run", "retry", "--output", "{}")
    assert ran.code == 2 and "--format" in ran.err, ran
    ran = paceline("resolve", instance_id, "run", "skip", "--output", "not json")
    assert ran.code == 2, ran
    ran = paceline("resolve", instance_id, "run", "later")
    assert ran.code == 2, ran
    assert instance(api, instance_id)["status"] == "FLAGGED"

    ran = ok(paceline("resolve", instance_id, "run", "skip", "--output", '{"exit_code": 0}'))
    assert lines_with(ran.out, "status", "RESOLVE_REQUESTED")
    final = wait_status(api, instance_id, "COMPLETED")
    assert final["outputs"]["after"] == {"code": 0}, "later steps read the --output"
    assert instance_id not in ok(paceline("flags")).out
    ran = paceline("resolve", instance_id, "run", "skip")
    assert ran.code == 1 and "(409)" in ran.err, ran


def test_why_of_a_signal_wait_and_signal(paceline: Run, api: httpx.Client, defs: Path) -> None:
    instance_id = start_api(api, "gate")
    wait_status(api, instance_id, "WAITING")
    words = ok(paceline("why", instance_id)).out
    assert "is WAITING since" in words.splitlines()[0]
    assert lines_with(words, "step ready: the signal go, until")
    assert f"paceline signal {instance_id} go" in words
    ran = ok(paceline("signal", instance_id, "go", "--payload", '{"ok": true}', "-o", "json"))
    assert ran.json()["status"] in ("DELIVERED", "BUFFERED")
    final = wait_status(api, instance_id, "COMPLETED")
    assert final["outputs"]["done"]["ok"]["signal"]["payload"] == {"ok": True}


# --- servers and watch ---------------------------------------------------------------------


def test_servers_and_watch(paceline: Run, api: httpx.Client, defs: Path) -> None:
    known = api.get("/v1/servers").json()["items"]
    table = ok(paceline("servers")).out
    for s in known:
        assert lines_with(table, s["id"], s["kind"], "ACTIVE"), (s["id"], table)
    body = ok(paceline("servers", "-o", "json")).json()
    assert set(body) == {"items", "truncated"}
    assert [(s["id"], s["status"]) for s in body["items"]] == [
        (s["id"], s["status"]) for s in known
    ]
    lines = ok(paceline("servers", "--kind", "scheduler", "-o", "jsonl")).out.splitlines()
    assert lines and {json.loads(line)["kind"] for line in lines} == {"scheduler"}

    shown = ok(paceline("watch", "--once")).out
    assert "Instances (newest" in shown and "Servers (" in shown
    assert all(s["id"] in shown for s in known)
    newest = api.get("/v1/instances", params={"limit": 1}).json()["items"][0]["id"]
    assert newest in shown
    lines = ok(paceline("watch", "--iterations", "2", "-n", "0.2", "-o", "jsonl")).out
    snaps = [json.loads(line) for line in lines.splitlines()]
    assert len(snaps) == 2
    assert all(set(s) == {"at", "instances", "servers"} for s in snaps)


def test_drain_and_forget_a_worker(paceline: Run, api: httpx.Client, defs: Path) -> None:
    workers = api.get("/v1/servers", params={"kind": "activity-worker"}).json()["items"]
    worker = workers[-1]["id"]
    ran = paceline("forget", worker)
    assert ran.code == 1 and "(409)" in ran.err, "an ACTIVE server is not removed"

    ran = ok(paceline("drain", worker, "-o", "json"))
    assert ran.json() == {"id": worker, "status": "ACTIVE", "drain_requested": True}

    def drained() -> bool:
        return any(
            s["id"] == worker and s["status"] == "DRAINED"
            for s in api.get("/v1/servers").json()["items"]
        )

    wait_until(drained, 30, f"{worker} to be DRAINED")
    assert lines_with(ok(paceline("servers", "-s", "drained")).out, worker, "DRAINED")
    assert worker in ok(paceline("forget", worker)).out
    assert worker not in {s["id"] for s in api.get("/v1/servers").json()["items"]}


# --- settings, usage and errors ------------------------------------------------------------


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_exit_codes_of_errors(paceline: Run, api: httpx.Client, cli_env: Any) -> None:
    ran = paceline("servers", token=None)
    assert ran.code == 2, ran
    assert "PACELINE_TOKEN is not set" in ran.err and ran.out == ""

    ran = paceline("servers", url="not a url")
    assert ran.code == 2 and "PACELINE_URL" in ran.err, ran

    ran = paceline("instances", "list", "--limit", "zero")
    assert ran.code == 2, ran

    closed = f"http://127.0.0.1:{_closed_port()}"
    ran = paceline("instances", "list", url=closed)
    assert ran.code == 3, ran
    assert ran.err.count("\n") == 1, "one line"
    assert ran.err.startswith(f"paceline: the admin API at {closed} cannot be reached")

    missing = str(uuid.uuid4())
    ran = paceline("describe", missing)
    assert ran.code == 1, ran
    assert ran.err.strip() == f"paceline: Not Found (404): instance {missing} does not exist"
    ran = paceline("why", "not-a-uuid")
    assert ran.code == 1 and "path.instance_id" in ran.err, ran

    wrong = "w" * 24
    ran = paceline("servers", token=wrong)
    assert ran.code == 1 and "Unauthorized (401)" in ran.err and "PACELINE_TOKEN" in ran.err
    assert wrong not in ran.err + ran.out
    ran = paceline("--url", closed, "servers")
    assert ran.code == 3, "--url overrides PACELINE_URL"


def _without_live(flags: dict) -> dict:
    """A flag listing without the holder's live state (kept: which server it is)."""

    def still(flag: dict) -> dict:
        holder = flag.get("holder")
        return {**flag, "holder": holder and {"server_id": holder["server_id"]}}

    return {**flags, "items": [{**f, "flag": still(f["flag"])} for f in flags["items"]]}
