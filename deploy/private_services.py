"""Private RabbitMQ and PostgreSQL instances, on ports of their own, for whatever stops or
restarts a broker or a database: the restart tests and `make chaos`. They never touch the
machine's own broker and database (the ones `make run` uses), which keep running untouched.

    broker = PrivateRabbitMQ.start()      # a node of its own: paceline-test-<id>@localhost
    broker.url                            # amqp://guest:guest@127.0.0.1:<port>/
    broker.restart()                      # rabbitmqctl -n <node> stop_app, then start_app
    broker.teardown()                     # the node stopped, its directory removed

    database = PrivatePostgres.start()    # a cluster of its own, on 127.0.0.1:<port>
    database.url                          # postgresql://postgres@127.0.0.1:<port>/postgres
    database.restart()                    # pg_ctl restart -m fast
    database.teardown()

`why_unavailable()` (or `available()`) says first whether this machine can run one. Each
instance lives in a directory of its own (`<tmp>/paceline-private-<kind>-<id>/`); teardown is
also registered with atexit, and an instance whose owner process died without it (SIGKILL) is
torn down by the next `start()` of any private instance on this machine.

The binaries are the installed ones (Debian: /usr/lib/rabbitmq/bin, /usr/lib/postgresql/<v>/bin).
RabbitMQ runs as the calling user (root included); PostgreSQL refuses root, so as root its
cluster belongs to, and runs as, the `postgres` system user.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import pwd
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

SBIN = ("/usr/local/sbin", "/usr/sbin", "/sbin")
RABBITMQ_BIN = Path("/usr/lib/rabbitmq/bin")
"""Debian's real scripts: /usr/sbin/rabbitmq-server is a wrapper that runs the server as the
`rabbitmq` user, with its output in /var/log/rabbitmq (the machine's node's own files)."""
POSTGRES_LIB = Path("/usr/lib/postgresql")
PREFIX = "paceline-private-"
START_TIMEOUT_S = 120.0
CONSUMER_TIMEOUT_MS = int(os.environ.get("PACELINE_RABBITMQ_CONSUMER_TIMEOUT_MS", "604800000"))
"""As deploy/ensure-services.sh sets on the machine's broker: an activity holds its message
unacknowledged until it ends."""


DIST_ON_LOOPBACK = "-kernel inet_dist_use_interface {127,0,0,1}"


class PrivateServiceError(RuntimeError):
    """A private instance could not be started, restarted or stopped (with what it said)."""


# --- helpers ----------------------------------------------------------------------------------


def _search_path() -> str:
    return os.pathsep.join([os.environ.get("PATH", ""), *SBIN])


def _which(name: str) -> str | None:
    return shutil.which(name, path=_search_path())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _free_ports(n: int) -> list[int]:
    ports: list[int] = []
    while len(ports) < n:
        port = _free_port()
        if port not in ports:
            ports.append(port)
    return ports


def _can_connect(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"({path} unreadable)"


def _run(
    argv: list[str],
    *,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    timeout: float = 60,
    check: bool = True,
) -> str:
    """Run `argv`; its output (stdout and stderr). Raises PrivateServiceError when it fails
    and `check`."""
    try:
        done = subprocess.run(
            argv,
            env=env,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise PrivateServiceError(f"{shlex.join(argv)} timed out after {timeout:.0f}s") from exc
    out = done.stdout.decode(errors="replace")
    if check and done.returncode != 0:
        raise PrivateServiceError(
            f"{shlex.join(argv)} failed ({done.returncode}): {out.strip()[-800:]}"
        )
    return out


def _new_directory(kind: str, tag: str) -> Path:
    """A directory of its own, with the owner's pid (for reap_orphans)."""
    directory = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{kind}-{tag}-"))
    (directory / "owner").write_text(f"{os.getpid()}\n")
    return directory


def reap_orphans() -> list[str]:
    """Tear down the private instances on this machine whose owner process is gone (killed
    before its atexit could run); what was reaped."""
    reaped = []
    for directory in sorted(Path(tempfile.gettempdir()).glob(f"{PREFIX}*")):
        try:
            owner = int((directory / "owner").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue  # not (yet) one of ours
        if owner == os.getpid() or _alive(owner) or (directory / "kept").exists():
            continue
        if directory.name.startswith(f"{PREFIX}rabbitmq-"):
            _kill_rabbitmq(directory)
        elif directory.name.startswith(f"{PREFIX}postgres-"):
            _kill_postgres(directory)
        else:
            continue
        shutil.rmtree(directory, ignore_errors=True)
        reaped.append(str(directory))
    return reaped


def _environ_mentions(pid: int, text: str) -> bool:
    """Whether process `pid` runs with `text` in its environment or command line (so a
    recycled pid is never killed by mistake)."""
    for name in ("environ", "cmdline"):
        with contextlib.suppress(OSError):
            if text.encode() in Path(f"/proc/{pid}/{name}").read_bytes():
                return True
    return False


def _kill_checked(pid_file: Path, mention: str, signum: int = signal.SIGKILL) -> None:
    try:
        pid = int(pid_file.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return
    if _alive(pid) and _environ_mentions(pid, mention):
        with contextlib.suppress(OSError):
            os.kill(pid, signum)


# --- RabbitMQ ---------------------------------------------------------------------------------


def _rabbitmq_script(name: str) -> str | None:
    real = RABBITMQ_BIN / name
    if real.is_file() and os.access(real, os.X_OK):
        return str(real)
    return _which(name)


def _machine_cookie() -> str | None:
    """The Erlang cookie this machine's `rabbitmqctl` uses: Debian's wrapper runs it, for root,
    as the `rabbitmq` user, whose home is /var/lib/rabbitmq; anyone else uses their own."""
    candidates = [Path.home() / ".erlang.cookie"]
    if os.geteuid() == 0:
        candidates.insert(0, Path("/var/lib/rabbitmq/.erlang.cookie"))
    for path in candidates:
        with contextlib.suppress(OSError):
            cookie = path.read_text().strip()
            if cookie:
                return cookie
    return None


def _kill_rabbitmq(directory: Path) -> None:
    _kill_checked(directory / "rabbitmq.pid", str(directory))


class PrivateRabbitMQ:
    """A RabbitMQ node of its own: its own name, AMQP and distribution ports (127.0.0.1 only),
    data, logs, configuration and (no) plugins. It shares the Erlang cookie of this machine's
    `rabbitmqctl`, so `rabbitmqctl -n <node>` (and deploy/ensure-services.sh with
    PACELINE_RABBITMQ_NODE) reaches it as it reaches the machine's node; every command here
    names the node."""

    def __init__(self, node: str, port: int, dist_port: int, directory: Path) -> None:
        self.node = node
        self.port = port
        self.dist_port = dist_port
        self.directory = directory
        self.process: subprocess.Popen[bytes] | None = None
        self.started_in_s: float | None = None

    def __repr__(self) -> str:
        return f"PrivateRabbitMQ({self.node}, port {self.port}, {self.directory})"

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    @property
    def log_path(self) -> Path:
        return self.directory / "log" / f"{self.node}.log"

    @staticmethod
    def why_unavailable() -> str | None:
        """Why no private node can run here; None when one can."""
        if _rabbitmq_script("rabbitmq-server") is None:
            return (
                "rabbitmq-server is not installed "
                "(Debian, as root: apt-get install rabbitmq-server)"
            )
        if _rabbitmq_script("rabbitmqctl") is None:
            return "rabbitmqctl is not installed"
        if _which("erl") is None:
            return "Erlang (erl) is not on PATH"
        return None

    @classmethod
    def available(cls) -> bool:
        return cls.why_unavailable() is None

    @classmethod
    def start(
        cls, name_prefix: str = "paceline-test", timeout: float = START_TIMEOUT_S
    ) -> PrivateRabbitMQ:
        """A new node, up and accepting AMQP connections."""
        why = cls.why_unavailable()
        if why is not None:
            raise PrivateServiceError(f"cannot start a private RabbitMQ: {why}")
        reap_orphans()
        began = time.monotonic()
        tag = secrets.token_hex(4)
        directory = _new_directory("rabbitmq", tag)
        port, dist_port = _free_ports(2)
        broker = cls(f"{name_prefix}-{tag}@localhost", port, dist_port, directory)
        with _starting(broker, began):
            broker._configure()
            broker._launch()
            broker._wait_up(timeout)
        return broker

    def _configure(self) -> None:
        d = self.directory
        for sub in ("mnesia", "log", "conf.d"):
            (d / sub).mkdir()
        cookie = d / ".erlang.cookie"
        cookie.write_text(_machine_cookie() or secrets.token_hex(20).upper())
        cookie.chmod(0o400)
        (d / "enabled_plugins").write_text("[].\n")  # no management/prometheus listeners
        (d / "rabbitmq-env.conf").write_text("# (none: not the machine's rabbitmq-env.conf)\n")
        (d / "rabbitmq.conf").write_text(
            "# A private node for Paceline's restart tests and chaos runs.\n"
            f"listeners.tcp.1 = 127.0.0.1:{self.port}\n"
            f"consumer_timeout = {CONSUMER_TIMEOUT_MS}\n"
            "log.console = false\n"
            "log.file.level = info\n"
        )

    def _server_environ(self) -> dict[str, str]:
        d = self.directory
        environ = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("RABBITMQ_", "ERL_")) and k not in {"NODENAME", "HOME"}
        }
        environ.update(
            {
                "PATH": _search_path(),
                "HOME": str(d),  # its .erlang.cookie
                "RABBITMQ_NODENAME": self.node,
                "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
                "RABBITMQ_NODE_PORT": str(self.port),
                "RABBITMQ_DIST_PORT": str(self.dist_port),
                "RABBITMQ_CONF_ENV_FILE": str(d / "rabbitmq-env.conf"),
                "RABBITMQ_CONFIG_FILE": str(d / "rabbitmq.conf"),
                "RABBITMQ_CONFIG_FILES": str(d / "conf.d"),
                "RABBITMQ_ADVANCED_CONFIG_FILE": str(d / "advanced.config"),
                "RABBITMQ_ENABLED_PLUGINS_FILE": str(d / "enabled_plugins"),
                "RABBITMQ_MNESIA_BASE": str(d / "mnesia"),
                "RABBITMQ_LOG_BASE": str(d / "log"),
                "RABBITMQ_PID_FILE": str(d / "rabbitmq.pid"),
                "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": DIST_ON_LOOPBACK,
                "ERL_EPMD_ADDRESS": "127.0.0.1",
            }
        )
        return environ

    def _ctl_environ(self) -> dict[str, str]:
        environ = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("RABBITMQ_") and k not in {"NODENAME", "HOME"}
        }
        environ.update(
            {
                "PATH": _search_path(),
                "HOME": str(self.directory),  # the node's cookie
                "RABBITMQ_CONF_ENV_FILE": str(self.directory / "rabbitmq-env.conf"),
            }
        )
        return environ

    def _launch(self) -> None:
        server = _rabbitmq_script("rabbitmq-server")
        assert server is not None
        with (self.directory / "log" / "console.log").open("ab") as console:
            self.process = subprocess.Popen(
                [server],
                env=self._server_environ(),
                cwd=self.directory,
                stdin=subprocess.DEVNULL,
                stdout=console,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: torn down as one
            )

    def _wait_up(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not _can_connect(self.port):
            if self.process is not None and self.process.poll() is not None:
                raise PrivateServiceError(
                    f"private RabbitMQ {self.node} exited ({self.process.returncode}):\n"
                    f"{_tail(self.directory / 'log' / 'console.log')}\n{_tail(self.log_path)}"
                )
            if time.monotonic() > deadline:
                raise PrivateServiceError(
                    f"private RabbitMQ {self.node} not accepting connections on port "
                    f"{self.port} after {timeout:.0f}s:\n{_tail(self.log_path)}"
                )
            time.sleep(0.2)
        left = max(5.0, deadline - time.monotonic())
        self.ctl("await_startup", "--timeout", str(int(left)), timeout=left + 10)

    def ctl(self, *argv: str, timeout: float = 60, check: bool = True) -> str:
        """`rabbitmqctl -q -n <this node> <argv>`: what it prints."""
        ctl = _rabbitmq_script("rabbitmqctl")
        assert ctl is not None
        return _run(
            [ctl, "-q", "-n", self.node, *argv],
            env=self._ctl_environ(),
            cwd=self.directory,
            timeout=timeout,
            check=check,
        )

    def stop_app(self) -> None:
        """The broker away (its AMQP port closed), the node still up."""
        self.ctl("stop_app")

    def start_app(self, timeout: float = START_TIMEOUT_S) -> None:
        """The broker back, and accepting connections again."""
        self.ctl("start_app", timeout=timeout)
        self._wait_up(timeout)

    def restart(self, down_s: float = 0.0) -> None:
        """stop_app, `down_s` seconds away, then start_app; back up (never left down)."""
        self.stop_app()
        try:
            time.sleep(down_s)
        finally:
            self.start_app()

    def keep(self) -> str:
        """Left running past this process (not torn down at exit, nor reaped): how to stop it."""
        _unregister(self)
        (self.directory / "kept").touch()
        return (
            f"private RabbitMQ node {self.node} on port {self.port}, in {self.directory} "
            f"(to stop it: rabbitmqctl -n {self.node} stop; rm -rf {self.directory})"
        )

    def teardown(self) -> None:
        """The node stopped (killed if it will not stop), its directory removed. Idempotent."""
        _unregister(self)
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(PrivateServiceError):
                self.ctl("stop", timeout=30, check=False)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(OSError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(15)
        _kill_rabbitmq(self.directory)  # whatever escaped the process group
        shutil.rmtree(self.directory, ignore_errors=True)


# --- PostgreSQL -------------------------------------------------------------------------------


def _postgres_bin() -> Path | None:
    """The newest installed PostgreSQL's bin directory (initdb and pg_ctl)."""

    def version(path: Path) -> tuple[int, ...]:
        return tuple(int(p) for p in re.findall(r"\d+", path.name)) or (0,)

    if POSTGRES_LIB.is_dir():
        for candidate in sorted(POSTGRES_LIB.iterdir(), key=version, reverse=True):
            bin_dir = candidate / "bin"
            if (bin_dir / "initdb").is_file() and (bin_dir / "pg_ctl").is_file():
                return bin_dir
    initdb, pg_ctl = _which("initdb"), _which("pg_ctl")
    if initdb and pg_ctl and Path(initdb).parent == Path(pg_ctl).parent:
        return Path(initdb).parent
    return None


def _postgres_user() -> str | None:
    """Who runs the cluster: None for the caller; `postgres` when the caller is root."""
    return "postgres" if os.geteuid() == 0 else None


def _as_postgres(argv: list[str]) -> list[str]:
    user = _postgres_user()
    if user is None:
        return argv
    runuser = _which("runuser")
    if runuser:
        return [runuser, "-u", user, "--", *argv]
    return ["su", user, "-s", "/bin/sh", "-c", shlex.join(argv)]


def _kill_postgres(directory: Path) -> None:
    data = directory / "data"
    bin_dir = _postgres_bin()
    if bin_dir is not None and (data / "postmaster.pid").exists():
        with contextlib.suppress(PrivateServiceError):
            _run(
                _as_postgres([str(bin_dir / "pg_ctl"), "-D", str(data), "stop", "-m", "immediate"]),
                cwd=directory,
                timeout=60,
            )
    # SIGQUIT: PostgreSQL's immediate shutdown, should pg_ctl have failed.
    _kill_checked(data / "postmaster.pid", str(data), signal.SIGQUIT)


class PrivatePostgres:
    """A PostgreSQL cluster of its own: 127.0.0.1 and a port of its own, trust logins for
    `postgres`, its socket in its own directory."""

    def __init__(self, port: int, directory: Path, bin_dir: Path) -> None:
        self.port = port
        self.directory = directory
        self.bin_dir = bin_dir
        self.started_in_s: float | None = None
        self._started = False

    def __repr__(self) -> str:
        return f"PrivatePostgres(port {self.port}, {self.directory})"

    @property
    def data(self) -> Path:
        return self.directory / "data"

    @property
    def log_path(self) -> Path:
        return self.directory / "postgresql.log"

    @property
    def url(self) -> str:
        """The server's `postgres` database; a stack creates its own next to it."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    @property
    def version(self) -> str:
        return self.bin_dir.parent.name

    @staticmethod
    def why_unavailable() -> str | None:
        """Why no private cluster can run here; None when one can."""
        if _postgres_bin() is None:
            return (
                "PostgreSQL's initdb and pg_ctl are not installed (Debian, as root: "
                "apt-get install postgresql)"
            )
        user = _postgres_user()
        if user is not None:
            try:
                pwd.getpwnam(user)
            except KeyError:
                return f"running as root, and there is no '{user}' user to run PostgreSQL as"
            if _which("runuser") is None and _which("su") is None:
                return f"running as root, and neither runuser nor su can run PostgreSQL as {user}"
        return None

    @classmethod
    def available(cls) -> bool:
        return cls.why_unavailable() is None

    @classmethod
    def start(cls, timeout: float = START_TIMEOUT_S) -> PrivatePostgres:
        """A new cluster, up and accepting connections."""
        why = cls.why_unavailable()
        if why is not None:
            raise PrivateServiceError(f"cannot start a private PostgreSQL: {why}")
        reap_orphans()
        bin_dir = _postgres_bin()
        assert bin_dir is not None
        began = time.monotonic()
        database = cls(_free_port(), _new_directory("postgres", secrets.token_hex(4)), bin_dir)
        with _starting(database, began):
            database._init()
            database._pg_ctl("start", timeout=timeout)
            database._started = True
            database._wait_up(timeout)
        return database

    def _init(self) -> None:
        user = _postgres_user()
        if user is not None:
            shutil.chown(self.directory, user, user)
        _run(
            _as_postgres(
                [
                    str(self.bin_dir / "initdb"),
                    *("-D", str(self.data), "-U", "postgres", "--auth", "trust"),
                    *("--encoding", "UTF8", "--locale", "C", "--no-sync"),
                ]
            ),
            cwd=self.directory,
            timeout=120,
        )
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.write(
                "\n# A private cluster for Paceline's restart tests and chaos runs.\n"
                f"port = {self.port}\n"
                "listen_addresses = '127.0.0.1'\n"
                f"unix_socket_directories = '{self.directory}'\n"
                "max_connections = 100\n"
            )
        (self.data / "pg_hba.conf").write_text(
            "# A private cluster: trust logins from this machine only.\n"
            "local all all trust\n"
            "host all all 127.0.0.1/32 trust\n"
            "host all all ::1/128 trust\n"
        )

    def _pg_ctl(self, *argv: str, timeout: float = START_TIMEOUT_S) -> None:
        _run(
            _as_postgres(
                [
                    str(self.bin_dir / "pg_ctl"),
                    *("-D", str(self.data), "-l", str(self.log_path)),
                    *("-w", "-t", str(int(timeout))),
                    *argv,
                ]
            ),
            cwd=self.directory,
            timeout=timeout + 30,
        )

    def _wait_up(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not _can_connect(self.port):
            if time.monotonic() > deadline:
                raise PrivateServiceError(
                    f"private PostgreSQL not accepting connections on port {self.port} after "
                    f"{timeout:.0f}s:\n{_tail(self.log_path)}"
                )
            time.sleep(0.2)

    def restart(self, timeout: float = START_TIMEOUT_S) -> None:
        """`pg_ctl restart -m fast`: every connection dropped, the server back up."""
        self._pg_ctl("restart", "-m", "fast", timeout=timeout)
        self._wait_up(timeout)

    def keep(self) -> str:
        """Left running past this process (not torn down at exit, nor reaped): how to stop it."""
        _unregister(self)
        (self.directory / "kept").touch()
        stop = shlex.join(
            _as_postgres([str(self.bin_dir / "pg_ctl"), "-D", str(self.data), "stop"])
        )
        return (
            f"private PostgreSQL on port {self.port}, in {self.directory} "
            f"(to stop it: {stop}; rm -rf {self.directory})"
        )

    def teardown(self) -> None:
        """The cluster stopped (immediately), its directory removed. Idempotent."""
        _unregister(self)
        if self._started:
            _kill_postgres(self.directory)
            self._started = False
        shutil.rmtree(self.directory, ignore_errors=True)


# --- teardown at exit ---------------------------------------------------------------------


class _Registry:
    live: ClassVar[list[PrivateRabbitMQ | PrivatePostgres]] = []
    hooked: ClassVar[bool] = False


def _register(instance: PrivateRabbitMQ | PrivatePostgres) -> None:
    if not _Registry.hooked:
        atexit.register(teardown_all)
        _Registry.hooked = True
    _Registry.live.append(instance)


def _unregister(instance: PrivateRabbitMQ | PrivatePostgres) -> None:
    with contextlib.suppress(ValueError):
        _Registry.live.remove(instance)


@contextlib.contextmanager
def _starting(instance: PrivateRabbitMQ | PrivatePostgres, began: float) -> Iterator[None]:
    """Around the start of `instance` (begun at `began`, a `time.monotonic()`): registered for
    teardown at exit; torn down at once if its start fails; then timed (`started_in_s`)."""
    _register(instance)
    try:
        yield
    except BaseException:
        instance.teardown()
        raise
    instance.started_in_s = time.monotonic() - began


def teardown_all() -> None:
    """Every private instance this process started and has not torn down (atexit)."""
    for instance in list(reversed(_Registry.live)):
        with contextlib.suppress(Exception):
            instance.teardown()
