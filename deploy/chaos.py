"""`make chaos`: a seeded, bounded run of random failures against a real stack, then a check
that every invariant held.

    python deploy/chaos.py [--seed N] [--faults N] [--duration SECONDS]
                           [--kinds kill,stop,term,rabbitmq,postgres,roll] [--rate N] [--keep]

The seed, the number of faults and the duration may also be set as PACELINE_CHAOS_SEED,
PACELINE_CHAOS_FAULTS and PACELINE_CHAOS_DURATION_S; an option given wins.

It starts its own stack (2 schedulers, 3 workers, reporting, admin) in a namespace and databases
of its own, an HTTP sink that counts non-restartable side effects, and a steady load of
instances; it injects `--faults` faults spread over `--duration` seconds (SIGKILL, SIGSTOP then
SIGCONT, SIGTERM drains of schedulers and workers; restarts of RabbitMQ and PostgreSQL: private
ones it starts for its stack on ports of their own, never this machine's; rolling restarts of
every worker in turn), while a supervisor restarts what died. The load brings its own: cancels
of running instances, poison activities that kill whatever runs them, and POSTs that time out
(chaos_load). Then it resolves every flag as an operator would (retry; fail a quarantined
poison), waits for the stack to settle and checks the invariants (chaos_check).
Exit status: 0 when every invariant held, 1 on any violation, 2 when the run itself failed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable

from chaos_api import Api, ApiUnavailable
from chaos_check import Check, check_all, observe
from chaos_faults import ALL_KINDS, Fault, Injector, plan, unavailable_kinds
from chaos_load import POISON, Load
from chaos_operator import OPEN, Operator
from chaos_report import Reporter, fault_table, history_lines, invariant_table
from chaos_roll import Roller
from chaos_supervisor import Supervisor
from chaos_triggers import Triggers
from effect_sink import Sink
from private_services import PrivatePostgres, PrivateRabbitMQ, PrivateServiceError
from stack_env import AMQP_URL, DATABASE_URL, StackEnv, drop_everything

from stack import BIN, COMMANDS, ROOT, Stack

LAYOUT = [("scheduler", 2), ("activity-worker", 3), ("reporting", 1), ("admin", 1)]
LIVENESS = {
    # Fast enough that a frozen peer is given up within a run: ~3 heartbeats of 2 s.
    "PACELINE_AMQP_HEARTBEAT_S": "2",
    "PACELINE_WORKER_GRACE_S": "5",
    "PACELINE_DEADLINE_GRACE_S": "3",
}
PROGRESS_S = 5.0
READY_S = 90.0


def migrate(stack: Stack, tries: int = 5) -> None:
    """Stack.migrate, with the migrations' log lines in the run's log instead of the terminal,
    tried again while another stack on this machine may be restarting PostgreSQL."""
    stack.log_dir.mkdir(parents=True, exist_ok=True)
    with (stack.log_dir / "migrate.log").open("ab") as log:
        for kind in ("scheduler", "reporting"):
            for attempt in range(tries):
                done = subprocess.run(
                    [str(BIN / COMMANDS[kind]), "migrate"],
                    env={**os.environ, **stack.env},
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
                if done.returncode == 0:
                    break
                if attempt == tries - 1:
                    raise RuntimeError(f"{kind} migrate failed: see {log.name}")
                time.sleep(3)


def _setting(parser: argparse.ArgumentParser, name: str, kind: type, default: object) -> object:
    """An option's default from the environment (PACELINE_CHAOS_*), like every other setting."""
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        return kind(raw)
    except ValueError:
        parser.error(f"{name}={raw!r} is not a {kind.__name__}")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--seed",
        type=int,
        default=_setting(parser, "PACELINE_CHAOS_SEED", int, None),
        help="replay a run (PACELINE_CHAOS_SEED; default: from the clock)",
    )
    parser.add_argument(
        "--faults",
        type=int,
        default=_setting(parser, "PACELINE_CHAOS_FAULTS", int, 200),
        help="faults to inject (PACELINE_CHAOS_FAULTS; 200)",
    )
    parser.add_argument(
        "--duration",
        type=float,
        default=_setting(parser, "PACELINE_CHAOS_DURATION_S", float, 300.0),
        help="seconds of faults (PACELINE_CHAOS_DURATION_S; 300)",
    )
    parser.add_argument(
        "--kinds", default=",".join(ALL_KINDS), help=f"comma-separated ({','.join(ALL_KINDS)})"
    )
    parser.add_argument("--rate", type=float, default=8, help="instances started per second (8)")
    parser.add_argument("--settle", type=float, default=120, help="seconds to settle (120)")
    parser.add_argument("--keep", action="store_true", help="keep databases, queues and logs")
    args = parser.parse_args(argv)
    args.kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    unknown = set(args.kinds) - set(ALL_KINDS)
    if unknown or not args.kinds:
        parser.error(f"--kinds: unknown {', '.join(sorted(unknown))}; use {','.join(ALL_KINDS)}")
    if args.faults < 0 or args.duration <= 0 or args.rate <= 0:
        parser.error("--faults must be >= 0, --duration and --rate > 0")
    if args.seed is None:
        args.seed = int(time.time()) % 1_000_000
    return args


async def wait_until(what: str, within_s: float, ready: Callable[[], Awaitable[bool]]) -> None:
    deadline = time.monotonic() + within_s
    while not await ready():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {within_s:.0f}s waiting for {what}")
        await asyncio.sleep(0.5)


async def inject_all(rep: Reporter, injector: Injector, faults: list[Fault]) -> None:
    for fault in faults:
        await asyncio.sleep(max(0.0, rep.begin + fault.at - time.monotonic()))
        try:
            await injector.inject(fault)
        except RuntimeError as exc:
            rep.say(f"fault {fault.index + 1}/{len(faults)}: {fault.kind} NOT injected: {exc}")
            continue
        fault.injected_at = rep.elapsed()
        rep.say(f"fault {fault.index + 1}/{len(faults)}: {fault.describe()}")


async def progress(
    rep: Reporter,
    api: Api,
    load: Load,
    faults: list[Fault],
    supervisor: Supervisor,
    done: asyncio.Event,
) -> None:
    while not done.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done.wait(), PROGRESS_S)
        if done.is_set():
            return
        injected = sum(f.injected_at is not None for f in faults)
        services = f"services up {supervisor.up_count()}/{len(supervisor.stack.services)}"
        try:
            still_open = await api.items("/v1/instances", {"status": OPEN}, patience=3)
            flagged = sum(i["status"] == "FLAGGED" for i in still_open)
            ended = max(0, len(load.started) - len(still_open))
            cancels = len(load.cancels.records) if load.cancels else 0
            counts = (
                f"started {len(load.started)}, ended {ended}, flagged {flagged}, "
                f"cancelled {cancels}"
            )
        except Exception as exc:  # progress must never end the run
            counts = f"started {len(load.started)} (API busy: {type(exc).__name__})"
        rep.say(
            f"faults {injected}/{len(faults)} | instances {counts} | {services}, "
            f"restarts {supervisor.restarts}"
        )


class Private:
    """The broker and database server of the run's own, for the kinds that restart them."""

    def __init__(self) -> None:
        self.broker: PrivateRabbitMQ | None = None
        self.database: PrivatePostgres | None = None
        self.failed: dict[str, str] = {}
        """Kinds left out because their private instance would not start, and why."""

    def start(self, kinds: list[str]) -> None:
        if "rabbitmq" in kinds:
            try:
                self.broker = PrivateRabbitMQ.start("paceline-chaos")
            except PrivateServiceError as exc:
                self.failed["rabbitmq"] = str(exc)
        if "postgres" in kinds:
            try:
                self.database = PrivatePostgres.start()
            except PrivateServiceError as exc:
                self.failed["postgres"] = str(exc)

    def describe(self) -> list[str]:
        lines = []
        if self.broker:
            lines.append(
                f"rabbitmq restarts: a private broker for this run, node {self.broker.node} "
                f"on port {self.broker.port} (up in {self.broker.started_in_s or 0:.1f}s)"
            )
        if self.database:
            lines.append(
                f"postgres restarts: a private PostgreSQL {self.database.version} for this run "
                f"on port {self.database.port} (up in {self.database.started_in_s or 0:.1f}s)"
            )
        return lines

    def teardown(self, keep: bool) -> list[str]:
        """Stopped and removed; with `keep`, left running (with the run's kept databases and
        queues): how to stop each."""
        kept = []
        for instance in (self.broker, self.database):
            if instance is None:
                continue
            if keep:
                kept.append(instance.keep())
            else:
                instance.teardown()
        return kept


async def chaos(
    args: argparse.Namespace, rep: Reporter, env: StackEnv, stack: Stack, private: Private
) -> bool:
    """The run itself; True when every invariant held."""
    timings: dict[str, float] = {}
    sink = Sink()
    sink.start()
    api = Api(env.base_url, env.token)
    done = asyncio.Event()  # ends the supervisor
    quiet = asyncio.Event()  # ends the progress lines
    try:
        mark = time.monotonic()
        await asyncio.to_thread(migrate, stack)
        for kind, count in LAYOUT:
            for _ in range(count):
                stack.add(kind)
        supervisor = Supervisor(stack, random.Random(f"{args.seed}/supervisor"), rep.note)

        async def all_up() -> bool:
            supervisor.tick()
            return supervisor.up_count() == len(stack.services) and await api.ready()

        await wait_until("the stack to be ready", READY_S, all_up)
        load = Load(api, random.Random(f"{args.seed}/load"), args.rate)
        await load.define(sink.url)
        triggers = Triggers(api)
        await triggers.define()
        timings["set-up"] = time.monotonic() - mark

        faults = plan(random.Random(f"{args.seed}/plan"), args.faults, args.duration, args.kinds)
        roller = Roller(supervisor, api, rep.say, rep.note)
        injector = Injector(
            supervisor,
            random.Random(f"{args.seed}/targets"),
            private.broker,
            private.database,
            roller,
        )
        rep.begin = mark = time.monotonic()
        background = [
            asyncio.create_task(supervisor.run(done)),
            asyncio.create_task(progress(rep, api, load, faults, supervisor, quiet)),
        ]
        await asyncio.gather(
            load.run(rep.begin + args.duration),
            triggers.run(rep.begin + args.duration),
            inject_all(rep, injector, faults),
        )
        await roller.finish()
        timings["faults and load"] = time.monotonic() - mark

        mark = time.monotonic()
        rep.say("faults over: resuming frozen services, restoring every service")
        supervisor.resume_all()
        await wait_until("every service to be up again", READY_S, all_up)
        rep.say("resolving every flag as an operator, until every instance has ended")
        operator = Operator(api)

        def settling(still_open: Counter[str], flagged: int) -> None:
            statuses = ", ".join(f"{n} {s}" for s, n in sorted(still_open.items()))
            rep.say(f"settling: {sum(still_open.values())} open ({statuses}), {flagged} flagged")

        settled = await operator.settle(args.settle, settling)
        timings["settle"] = time.monotonic() - mark
        quiet.set()
        rep.say("settled" if settled else "NOT settled: instances still open (see the checks)")

        mark = time.monotonic()
        posts = sink.posts()
        arrivals = {path: sink.arrivals(path) for path in posts}
        seen = await observe(api, posts, operator.retried, arrivals)
        checks = await check_all(
            env,
            api,
            load,
            seen,
            rolls=roller.rolls,
            failed=operator.failed,
            settled=settled,
            triggers=triggers,
        )
        timings["checks"] = time.monotonic() - mark
        done.set()
        await asyncio.gather(*background)
        await report(rep, api, args, faults, checks, timings, supervisor, operator, load)
        return all(c.ok for c in checks)
    finally:
        done.set()
        quiet.set()
        await api.close()
        sink.stop()


async def report(
    rep: Reporter,
    api: Api,
    args: argparse.Namespace,
    faults: list[Fault],
    checks: list[Check],
    timings: dict[str, float],
    supervisor: Supervisor,
    operator: Operator,
    load: Load,
) -> None:
    rep.block(["", *fault_table(faults), ""])
    rep.block([*invariant_table(checks), ""])
    for instance_id in sorted({i for c in checks if not c.ok for i in c.instances}):
        try:
            response = await api.call("GET", f"/v1/instances/{instance_id}/history")
            rep.block(history_lines(instance_id, response.json().get("items", [])))
        except ApiUnavailable as exc:
            rep.say(f"no history for {instance_id}: {exc}")
    times = ", ".join(f"{k} {v:.0f}s" for k, v in timings.items())
    assert load.cancels is not None
    cancels = ", ".join(f"{n} {k}" for k, n in sorted(load.cancels.summary().items()))
    poison = sum(load.definition_of.get(k) == POISON for k in load.started.values())
    timing_out = sum(bool(load.inputs_of[k].get("hold_first")) for k in load.started.values())
    unknown = operator.flag_kinds["outcome_unknown"] + operator.failed_kinds["outcome_unknown"]
    rep.block(
        [
            f"chaos: seed {args.seed}; {times}",
            f"chaos: service restarts {supervisor.restarts}; {operator.describe()}; "
            f"API calls tried again {api.retries}",
            f"chaos: load: {len(load.started)} instances; cancels {len(load.cancels.records)} "
            f"({cancels or 'none'}); poison instances {poison}; instances whose first POST "
            f"times out {timing_out}; outcome_unknown flags {unknown}",
            f"chaos: {sum(c.ok for c in checks)} of {len(checks)} invariants held: "
            + ("OK" if all(c.ok for c in checks) else "VIOLATED"),
        ]
    )


async def main(argv: list[str]) -> int:
    args = parse_args(argv)
    skipped = {k: why for k, why in unavailable_kinds().items() if k in args.kinds}
    args.kinds = [k for k in args.kinds if k not in skipped]
    # Broker and database restarts act on private instances of the run's own (its stack uses
    # them), never on this machine's: a `make run` stack may be using those.
    private = Private()
    try:
        await asyncio.to_thread(private.start, args.kinds)
    except BaseException:
        private.teardown(keep=False)
        raise
    skipped |= private.failed
    args.kinds = [k for k in args.kinds if k not in skipped]
    env = StackEnv.fresh(
        "plchaos",
        amqp_url=private.broker.url if private.broker else AMQP_URL,
        rabbitmq_node=private.broker.node if private.broker else None,
        server_url=private.database.url if private.database else DATABASE_URL,
    )
    log_dir = ROOT / ".paceline" / "chaos" / env.namespace
    rep = Reporter(log_dir / "chaos.log")
    rep.say(f"seed {args.seed} (replay with --seed {args.seed})")
    for kind, why in skipped.items():
        rep.say(f"leaving out {kind} restarts: {why}")
    for line in private.describe():
        rep.say(line)
    rep.say(
        f"{args.faults} faults ({','.join(args.kinds)}) over {args.duration:.0f}s, "
        f"{args.rate:g} instances/s; namespace {env.namespace}; logs in {log_dir}"
    )
    stack = Stack(env={**env.variables(), **LIVENESS}, log_dir=log_dir)
    # Ctrl-C or SIGTERM (a CI job's time-out) ends the run the same way: cancelled, then torn
    # down below, so no service process or name of the run is left behind.
    main_task = asyncio.current_task()
    assert main_task is not None
    for signum in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(signum, main_task.cancel)
    ok = False
    try:
        ok = await chaos(args, rep, env, stack, private)
    except asyncio.CancelledError:
        rep.say("interrupted: stopping the stack")
        return 130
    except Exception as exc:
        rep.say(f"the run failed: {exc!r}")
        return 2
    finally:
        await asyncio.to_thread(stack.stop_all, 30)
        if args.keep:
            rep.say(
                f"kept: namespace {env.namespace}, databases {env.database}, "
                f"{env.reporting_database}; logs in {log_dir}"
            )
        else:
            try:
                await drop_everything(env)
            except Exception as exc:
                rep.say(f"could not drop {env.namespace}'s databases and queues: {exc!r}")
            if not ok:
                rep.say(f"logs kept in {log_dir}")
        for how in await asyncio.to_thread(private.teardown, args.keep):
            rep.say(f"kept: {how}")
        rep.close()
        if ok and not args.keep:
            shutil.rmtree(log_dir, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1:])))
