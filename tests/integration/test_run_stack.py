"""`make run`'s supervisor (deploy/run_stack.py) as a real process over a real broker and
database: it checks every setting before anything starts, keeps its layout running (a process
that exits for any reason is replaced, with a backoff for a crash loop), and stops everything
with one friendly shutdown on Ctrl-C."""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager, suppress
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from run_stack import Backoff
from stack_env import DATABASE_URL, StackEnv, drop_everything

from integration.harness import TEST_VARIABLES, wait_final, wait_for

pytestmark = pytest.mark.integration
RUN_STACK = Path(__file__).resolve().parents[2] / "deploy" / "run_stack.py"
SERVICE_COMMANDS = (
    "paceline-scheduler",
    "paceline-activity-worker",
    "paceline-reporting",
    "paceline-admin",
)


class Console:
    """The supervisor's output, read line by line as it comes."""

    def __init__(self, stream: asyncio.StreamReader) -> None:
        self.stream = stream
        self.seen: list[str] = []

    async def expect(self, pattern: str, timeout: float = 60) -> re.Match[str]:
        async def scan() -> re.Match[str]:
            while True:
                line = (await self.stream.readline()).decode()
                if not line:
                    raise AssertionError(f"supervisor output ended; saw:\n{self.text}")
                self.seen.append(line)
                if m := re.search(pattern, line):
                    return m

        try:
            return await asyncio.wait_for(scan(), timeout)
        except TimeoutError:
            raise AssertionError(f"no {pattern!r} within {timeout}s; saw:\n{self.text}") from None

    async def rest(self, timeout: float = 90) -> str:
        """Everything until the output ends."""
        rest = await asyncio.wait_for(self.stream.read(), timeout)
        self.seen.append(rest.decode())
        return self.text

    @property
    def text(self) -> str:
        return "".join(self.seen)


class Run:
    def __init__(self, proc: asyncio.subprocess.Process, env: StackEnv, log_dir: Path) -> None:
        assert proc.stdout is not None
        self.proc = proc
        self.env = env
        self.log_dir = log_dir
        self.console = Console(proc.stdout)
        self.pids: dict[str, int] = {}
        self.token = ""

    async def started(self) -> dict[str, int]:
        """The services it started, by name, with their pids; and the token it printed."""
        line = await self.console.expect(r"started (.*)")
        self.pids = {
            name: int(pid) for name, pid in re.findall(r"([a-z-]+-\d+) \(pid (\d+)\)", line[1])
        }
        self.token = (await self.console.expect(r"API token: (\S+)"))[1]
        return self.pids

    @asynccontextmanager
    async def api(self) -> AsyncIterator[httpx.AsyncClient]:
        async with httpx.AsyncClient(
            base_url=self.env.base_url, headers={"Authorization": f"Bearer {self.token}"}
        ) as api:

            async def ready() -> bool:
                try:
                    return (await api.get("/readyz")).status_code == 200
                except httpx.HTTPError:
                    return False

            await wait_for(ready, 60, "the admin API")
            yield api

    async def ctrl_c(self) -> int:
        """SIGINT to the supervisor (only), and wait until it has stopped the stack."""
        self.proc.send_signal(signal.SIGINT)
        await self.console.expect(r"paceline: stopped", timeout=90)
        return await asyncio.wait_for(self.proc.wait(), 30)

    def logs(self) -> dict[str, str]:
        if not self.log_dir.exists():
            return {}
        return {p.name: p.read_text(errors="replace") for p in self.log_dir.iterdir()}


@asynccontextmanager
async def supervisor(
    tmp_path: Path,
    *,
    keep_token: bool = False,
    own_group: bool = False,
    via_make: bool = False,
    **settings: str,
) -> AsyncIterator[Run]:
    """`make run`'s supervisor on a stack of its own names, logging to `tmp_path`; killed
    (with its services) and its names dropped at the end. `via_make`: started as a user
    starts it, `make run` (make, then uv, then the supervisor), not the supervisor alone."""
    env = StackEnv.fresh("pltest")
    variables = {**env.variables(), **TEST_VARIABLES, **settings}
    if not keep_token:
        variables.pop("PACELINE_ADMIN_TOKEN")
    log_dir = tmp_path / "logs"
    command = (
        ["make", "-s", "-C", str(RUN_STACK.parents[1]), "run", f"RUN_ARGS=--log-dir {log_dir}"]
        if via_make
        else [sys.executable, str(RUN_STACK), "--log-dir", str(log_dir)]
    )
    proc = await asyncio.create_subprocess_exec(
        *command,
        env={**os.environ, **variables},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=own_group,
    )
    run = Run(proc, env, log_dir)
    try:
        yield run
    finally:
        if proc.returncode is None:  # a test that failed: stop it as Ctrl-C would, or kill it
            if own_group:
                os.killpg(proc.pid, signal.SIGINT)
            else:
                proc.send_signal(signal.SIGINT)
            try:
                await asyncio.wait_for(proc.wait(), 60)
            except TimeoutError:
                proc.kill()  # its services get SIGTERM from the kernel (PR_SET_PDEATHSIG)
                await proc.wait()
        for pid in run.pids.values():
            # A pid of a service long gone may be another test's process by now.
            if _runs_in(pid, env.namespace):
                with suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        await drop_everything(env)


def _runs_in(pid: int, namespace: str) -> bool:
    """Whether `pid` is a process of the stack named `namespace` (from its environment)."""
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False
    return f"PACELINE_NAMESPACE={namespace}".encode() in environ


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is dead here
    except (ProcessLookupError, FileNotFoundError):
        return False


def _group_alive(pgid: int) -> bool:
    """Whether any live process is in the process group `pgid`."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with suppress(OSError):
                if os.getpgid(int(entry.name)) == pgid and _alive(int(entry.name)):
                    return True
    return False


async def _servers(api: httpx.AsyncClient) -> dict[int, dict[str, Any]]:
    """The registry's servers by pid (every server of this stack's own database)."""
    body = (await api.get("/v1/servers")).json()
    return {s["pid"]: s for s in body["items"]}


async def _database_exists(name: str) -> bool:
    conn = await asyncpg.connect(DATABASE_URL.rsplit("/", 1)[0] + "/postgres")
    try:
        return bool(await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name))
    finally:
        await conn.close()


async def _run_noop(api: httpx.AsyncClient) -> dict[str, Any]:
    flow = {"name": "hello", "steps": [{"id": "hi", "type": "noop", "with": {"a": 1}}]}
    assert (await api.post("/v1/definitions", json=flow)).status_code == 201
    r = await api.post("/v1/instances", json={"definition": "hello"})
    assert r.status_code == 202, r.text
    return (await wait_final(api, [r.json()["id"]]))[r.json()["id"]]


async def test_supervisor_restarts_a_killed_service_and_stops_friendly(tmp_path: Path) -> None:
    async with supervisor(tmp_path) as run:
        pids = await run.started()
        assert set(pids) == {
            "scheduler-1",
            "activity-worker-1",
            "activity-worker-2",
            "reporting-1",
            "admin-1",
        }
        assert len(run.token) >= 24, "a generated token"
        async with run.api() as api:
            os.kill(pids["activity-worker-1"], signal.SIGKILL)
            await run.console.expect(
                rf"activity-worker-1 \(pid {pids['activity-worker-1']}\) exited "
                r"\(killed by SIGKILL\)"
            )
            await run.console.expect(r"activity-worker-1 started again \(pid \d+\)")
            assert (await _run_noop(api))["status"] == "COMPLETED"

        assert await run.ctrl_c() == 0
        for name, pid in pids.items():
            if name != "activity-worker-1":
                assert not _alive(pid), f"{name} still running after Ctrl-C"


async def test_a_sigtermed_worker_drains_and_a_fresh_process_replaces_it(
    tmp_path: Path,
) -> None:
    # One worker: whatever runs after the SIGTERM, the replacement ran it.
    async with supervisor(tmp_path, PACELINE_WORKERS="1") as run:
        pids = await run.started()
        old = pids["activity-worker-1"]
        async with run.api() as api:
            await wait_for(
                lambda: _servers(api), 30, "the first worker in the registry", interval=0.5
            )
            os.kill(old, signal.SIGTERM)
            exited = await run.console.expect(
                rf"activity-worker-1 \(pid {old}\) exited \((.*?)\) after .*the end of its log:"
            )
            assert exited[1] == "code 0, a friendly shutdown", "a SIGTERM is a drain, not a crash"
            tail = []
            while not (line := await run.console.expect(r".*")).group(0).startswith("paceline:"):
                tail.append(line.group(0))
            assert tail and all(t.startswith("    ") for t in tail), run.console.text
            assert any(f"-{old}-" in t and "stopped" in t for t in tail), "its last log lines"
            assert "starting a fresh process" in line.group(0)
            new = int(
                (await run.console.expect(r"activity-worker-1 started again \(pid (\d+)\)"))[1]
            )
            assert new != old and _alive(new) and not _alive(old)

            async def registry() -> tuple[dict[str, Any], dict[str, Any]] | None:
                servers = await _servers(api)
                drained, fresh = servers.get(old, {}), servers.get(new, {})
                if drained.get("status") == "DRAINED" and fresh.get("status") == "ACTIVE":
                    return drained, fresh
                return None

            drained, fresh = await wait_for(registry, 30, "old DRAINED, new ACTIVE")
            assert drained["kind"] == fresh["kind"] == "activity-worker"
            assert drained["id"] != fresh["id"], "a new server id"

            done = await _run_noop(api)
            assert done["status"] == "COMPLETED"
            assert done["activities"][0]["server"] == fresh["id"], "the replacement ran it"
        assert await run.ctrl_c() == 0


async def _start_shell(api: httpx.AsyncClient, name: str, script: str) -> str:
    """Start a process whose one step runs `sh -c script`; returns its id once the step runs."""
    step = {"id": "shell", "type": "shell.command", "with": {"argv": ["sh", "-c", script]}}
    assert (await api.post("/v1/definitions", json={"name": name, "steps": [step]})).is_success
    started = await api.post("/v1/instances", json={"definition": name})
    instance_id = str(started.json()["id"])

    async def running() -> bool:
        body = (await api.get(f"/v1/instances/{instance_id}")).json()
        return any(a["status"] == "RUNNING" and a.get("claimed_by") for a in body["activities"])

    await wait_for(running, 30, "the shell step to run")
    return instance_id


async def _every_one_active(api: httpx.AsyncClient, pids: dict[str, int]) -> dict[int, Any]:
    async def active() -> dict[int, dict[str, Any]] | None:
        servers = await _servers(api)
        found = {p: s for p, s in servers.items() if s["status"] == "ACTIVE"}
        return found if set(found) == set(pids.values()) else None

    return dict(await wait_for(active, 30, "every service ACTIVE"))


async def test_the_layout_is_a_setting(tmp_path: Path) -> None:
    async with supervisor(tmp_path, PACELINE_WORKERS="1", PACELINE_SCHEDULERS="2") as run:
        pids = await run.started()
        assert set(pids) == {
            "scheduler-1",
            "scheduler-2",
            "activity-worker-1",
            "reporting-1",
            "admin-1",
        }
        async with run.api() as api:
            active = await _every_one_active(api, pids)
            kinds = sorted(s["kind"] for s in active.values())
            assert kinds == ["activity-worker", "admin", "reporting", "scheduler", "scheduler"]
        assert await run.ctrl_c() == 0


@contextmanager
def _listening(port: int) -> Iterator[None]:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        s.listen()
        yield


def _service_processes(namespace: str) -> list[str]:
    """Service processes (`run`, or `migrate`) of this namespace, as their command lines."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        words = [a.decode(errors="replace") for a in argv if a]
        if (
            f"PACELINE_NAMESPACE={namespace}".encode() in environ
            and words
            and words[-1] in ("run", "migrate")
            and any(w.endswith(SERVICE_COMMANDS) for w in words)
        ):
            found.append(" ".join(words))
    return found


async def test_invalid_settings_are_all_reported_before_anything_starts(tmp_path: Path) -> None:
    token = "too-short-tok"  # 13 characters: the admin wants 16
    async with supervisor(
        tmp_path, keep_token=True, PACELINE_ADMIN_TOKEN=token, PACELINE_WORKERS="two"
    ) as run:
        with _listening(run.env.admin_port):
            seen: set[str] = set()
            deadline = time.monotonic() + 60
            while run.proc.returncode is None and time.monotonic() < deadline:
                seen.update(_service_processes(run.env.namespace))  # any service process
                with suppress(TimeoutError):
                    await asyncio.wait_for(run.proc.wait(), 0.02)
            assert run.proc.returncode is not None, f"still running after 60 s; ran {seen}"
            out = await run.console.rest()
        assert run.proc.returncode == 2, out
        assert re.search(r"PACELINE_ADMIN_TOKEN: use at least 16 characters", out), out
        assert re.search(r"PACELINE_WORKERS: .*valid integer.*'two'", out), out
        assert re.search(rf"PACELINE_ADMIN_PORT: port {run.env.admin_port} cannot be bound", out)
        assert "nothing was started" in out
        assert token not in out, "a secret is never printed"
        assert not seen, f"a service process ran: {seen}"
        assert "started" not in out.replace("nothing was started", "")
        assert not run.log_dir.exists(), "no service log"
        assert not await _database_exists(run.env.database), "no migration either"


async def _instance_status(env: StackEnv, instance_id: str) -> str | None:
    conn = await asyncpg.connect(env.database_url)
    try:
        status = await conn.fetchval(
            "SELECT status FROM instances WHERE id = $1::uuid", instance_id
        )
        return None if status is None else str(status)
    finally:
        await conn.close()


async def test_ctrl_c_in_a_terminal_drains_every_service_once(tmp_path: Path) -> None:
    # `make run` leads a process group of its own, as a shell's foreground job does; the
    # terminal's Ctrl-C is a SIGINT to that whole group: make, uv (which forwards it to the
    # supervisor once more) and the supervisor.
    async with supervisor(tmp_path, own_group=True, via_make=True) as run:
        pids = await run.started()
        pgid = run.proc.pid
        assert os.getpgid(pgid) == pgid
        async with run.api() as api:
            instance_id = await _start_shell(api, "slow", "sleep 4; echo done")
        interrupted = time.monotonic()
        os.killpg(pgid, signal.SIGINT)
        # make itself, interrupted too, waits for its recipe, then dies of the SIGINT it got.
        assert await asyncio.wait_for(run.proc.wait(), 90) in (0, -signal.SIGINT)
        took = time.monotonic() - interrupted
        out = await run.console.rest()
        assert re.search(r"^paceline: stopped$", out, re.MULTILINE), out
        assert "SIGINT: stopping every service" in out
        assert out.count("stopping every service") == 1, out
        assert "killing" not in out and "had to be killed" not in out, out
        for name, text in run.logs().items():
            assert "second SIGTERM" not in text and "second SIGINT" not in text, (name, text)
        for name, pid in pids.items():
            assert not _alive(pid), f"{name} still running after Ctrl-C"
            assert not _group_alive(pid), f"something of {name}'s process group still runs"
        assert await _instance_status(run.env, instance_id) == "COMPLETED", (
            f"the instance did not end COMPLETED (stopped {took:.1f}s after Ctrl-C):\n{out}"
        )


async def test_a_second_ctrl_c_kills_what_still_runs(tmp_path: Path) -> None:
    async with supervisor(tmp_path, own_group=True) as run:
        pids = await run.started()
        async with run.api() as api:
            await _start_shell(api, "long", "sleep 60")  # the worker's drain would wait 10 s
        os.killpg(run.proc.pid, signal.SIGINT)
        await run.console.expect(r"SIGINT: stopping every service")
        await asyncio.sleep(1.5)  # a person's second Ctrl-C; one within a second is the same
        interrupted = time.monotonic()
        os.killpg(run.proc.pid, signal.SIGINT)
        await run.console.expect(r"second SIGINT: killing every service now")
        assert await asyncio.wait_for(run.proc.wait(), 30) == 1, "not a friendly stop"
        assert time.monotonic() - interrupted < 8, "killed, not drained for the grace period"
        out = await run.console.rest()
        assert re.search(r"activity-worker-\d \(pid \d+\) exited \(killed by SIGKILL\)", out), out
        assert "stopped (some services had to be killed)" in out
        for name, pid in pids.items():
            assert not _alive(pid), f"{name} still running after the second Ctrl-C"


async def test_services_drain_when_the_supervisor_is_killed(tmp_path: Path) -> None:
    async with supervisor(tmp_path) as run:
        pids = await run.started()
        async with run.api() as api:
            await _every_one_active(api, pids)
        run.proc.kill()  # no chance to stop anything itself
        await run.proc.wait()

        def all_gone() -> bool:
            return not any(_alive(pid) for pid in pids.values())

        await wait_for(all_gone, 60, "every service to exit after its supervisor died")
        logs = run.logs()
        for name in pids:
            text = logs[f"{name}.log"]
            assert re.search(r"SIGTERM: (shutting down|finishing requests)", text), (name, text)
            assert "second SIG" not in text, (name, text)


async def test_a_crash_loop_is_backed_off(tmp_path: Path) -> None:
    async with supervisor(tmp_path, PACELINE_WORKERS="1") as run:
        pid = (await run.started())["activity-worker-1"]
        delays = []
        for _ in range(4):
            os.kill(pid, signal.SIGKILL)  # a crash seconds after its start, every time
            await run.console.expect(rf"activity-worker-1 \(pid {pid}\) exited \(killed by SIGKILL")
            delay = await run.console.expect(
                r"activity-worker-1: starting a fresh process in ([\d.]+) s"
            )
            delays.append(float(delay[1]))
            pid = int((await run.console.expect(r"activity-worker-1 started again \(pid (\d+)"))[1])
        assert delays == [0.5, 1, 2, 4], run.console.text
        assert await run.ctrl_c() == 0


async def _check(command: str, environ: dict[str, str]) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).parent / command),
        "check",
        env=environ,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode()


async def test_every_service_checks_its_settings() -> None:
    # That each says 0 when they are fine, every stack the tests above start shows.
    bad = {
        **os.environ,
        **StackEnv.fresh("pltest").variables(),
        "PACELINE_AMQP_HEARTBEAT_S": "0",
        "PACELINE_ADMIN_TOKEN": "short-secret",
    }
    results = await asyncio.gather(*(_check(command, bad) for command in SERVICE_COMMANDS))
    for command, (code, out) in zip(SERVICE_COMMANDS, results, strict=True):
        assert code == 2, (command, out)
        assert f"{command}: PACELINE_AMQP_HEARTBEAT_S: " in out, (command, out)
        assert "short-secret" not in out, "a secret is never printed"
    admin = results[SERVICE_COMMANDS.index("paceline-admin")][1]
    assert "paceline-admin: PACELINE_ADMIN_TOKEN: use at least 16 characters" in admin


def test_backoff_doubles_to_a_cap_and_starts_over_after_a_stable_run() -> None:
    backoff = Backoff(initial=0.5, maximum=30, stable_after=30)
    assert [backoff.after_exit(1) for _ in range(9)] == [0.5, 1, 2, 4, 8, 16, 30, 30, 30]
    assert backoff.after_exit(31) == 0.5, "up 30 s: no crash loop"
    assert backoff.after_exit(2) == 1


async def test_a_token_of_the_users_own_is_never_echoed(tmp_path: Path) -> None:
    token = "my-own-secret-token-" + secrets.token_hex(8)
    async with supervisor(tmp_path, keep_token=True, PACELINE_ADMIN_TOKEN=token) as run:
        line = await run.console.expect(r"API token: (.*)")
        assert line[1] == "yours, PACELINE_ADMIN_TOKEN"
        assert await run.ctrl_c() == 0
        out = run.console.text
    assert token not in out
    for name, text in run.logs().items():
        assert token not in text, name
