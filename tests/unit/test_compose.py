"""The compose stack (deploy/compose/, `make up` / `make down`): every file parses, and the
parts name each other consistently: the services' settings, the collector's pipeline, Tempo's
metrics generator, the log shipping, Grafana's datasources and the "Paceline processes"
dashboard, the image. Where a compose implementation answers, it validates the file too. The
scripts are run against fake engines, so their behaviour does not depend on this machine."""

from __future__ import annotations

import fnmatch
import http.server
import json
import logging
import os
import re
import shutil
import socket
import stat
import subprocess
import threading
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from opentelemetry import trace
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

from paceline_contracts.states import ActivityStatus, InstanceStatus, ServerKind
from paceline_engine.events import HistoryKind
from paceline_infra.logs import setup_logging

ROOT = Path(__file__).resolve().parents[2]
HERE = ROOT / "deploy" / "compose"
COMPOSE_FILE = HERE / "compose.yaml"


def load(relative: str) -> Any:
    return yaml.safe_load((HERE / relative).read_text(encoding="utf-8"))


COMPOSE = load("compose.yaml")
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
# The services built from this repository (the one image): the Paceline services.
PACELINE = {name: s for name, s in SERVICES.items() if "build" in s}
COLLECTOR = load("otel-collector/config.yaml")
TEMPO = load("tempo/tempo.yaml")
PROMETHEUS = load("prometheus/prometheus.yml")
LOKI = load("loki/loki.yaml")
DATASOURCES = load("grafana/provisioning/datasources/datasources.yaml")["datasources"]
PROVIDERS = load("grafana/provisioning/dashboards/dashboards.yaml")["providers"]
DASHBOARD = json.loads(
    (HERE / "grafana/dashboards/paceline-processes.json").read_text(encoding="utf-8")
)
ALLOY = (HERE / "alloy/config.alloy").read_text(encoding="utf-8")
DOCKERFILE = (HERE / "Dockerfile").read_text(encoding="utf-8")

SETTINGS_DOC = (ROOT / "docs" / "settings.md").read_text(encoding="utf-8")
DOCUMENTED = {
    name
    for line in SETTINGS_DOC.splitlines()
    if line.lstrip().startswith("|")
    for name in re.findall(r"`([A-Z][A-Z0-9_]*)`", line)
}
# The OpenTelemetry SDK's own variables that the stack sets (a misspelt one is ignored silently).
OTEL_SDK_VARIABLES = {
    "OTEL_BSP_SCHEDULE_DELAY",
    "OTEL_BSP_MAX_QUEUE_SIZE",
    "OTEL_BSP_MAX_EXPORT_BATCH_SIZE",
    "OTEL_BSP_EXPORT_TIMEOUT",
    "OTEL_RESOURCE_ATTRIBUTES",
    "OTEL_SEMCONV_STABILITY_OPT_IN",
    "OTEL_TRACES_SAMPLER",
    "OTEL_TRACES_SAMPLER_ARG",
}
SPECIAL_DATASOURCES = {"-- Mixed --", "-- Grafana --", "-- Dashboard --"}
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
SPAN_ID = "00f067aa0ba902b7"


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def default_of(value: str) -> str:
    """A compose value with its ${NAME:-default} references replaced by their defaults."""
    return re.sub(r"\$\{[A-Z0-9_]+:-([^}]*)\}", r"\1", value)


def bind_mounts(service: dict[str, Any]) -> list[tuple[str, str]]:
    """(source, target) of each bind mount of a file or folder of deploy/compose/."""
    mounts = []
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith("./"):
            mounts.append((source, target))
    return mounts


def command_of(service: dict[str, Any]) -> list[str]:
    command = service.get("command", [])
    return command.split() if isinstance(command, str) else list(command)


def uid(ds: Any) -> str | None:
    return ds.get("uid") if isinstance(ds, dict) else None


# ---- every file parses --------------------------------------------------------------------

EXPECTED_FILES = [
    "compose.yaml",
    "Dockerfile",
    "up.sh",
    "down.sh",
    "engine.sh",
    "otel-collector/config.yaml",
    "tempo/tempo.yaml",
    "prometheus/prometheus.yml",
    "loki/loki.yaml",
    "alloy/config.alloy",
    "rabbitmq/20-paceline.conf",
    "postgres/10-grafana-reader.sh",
    "grafana/provisioning/datasources/datasources.yaml",
    "grafana/provisioning/dashboards/dashboards.yaml",
    "grafana/dashboards/paceline-processes.json",
]


def test_the_stack_files_exist() -> None:
    missing = [f for f in EXPECTED_FILES if not (HERE / f).is_file()]
    assert not missing


@pytest.mark.parametrize(
    "path",
    sorted(
        str(p.relative_to(HERE))
        for p in HERE.rglob("*")
        if p.suffix in {".yaml", ".yml", ".json"} and p.is_file()
    ),
)
def test_every_yaml_and_json_file_parses(path: str) -> None:
    text = (HERE / path).read_text(encoding="utf-8")
    document = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
    assert isinstance(document, dict) and document, f"{path} is empty"


@pytest.mark.parametrize("script", ["up.sh", "down.sh", "engine.sh"])
def test_the_scripts_are_valid_bash(script: str) -> None:
    result = subprocess.run(["bash", "-n", str(HERE / script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_every_file_a_service_mounts_exists() -> None:
    missing = [
        f"{name}: {source}"
        for name, service in SERVICES.items()
        for source, _ in bind_mounts(service)
        if not (HERE / source).exists()
    ]
    assert not missing


# ---- compose.yaml -------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_every_service_has_an_image_or_a_build(name: str) -> None:
    assert "image" in SERVICES[name] or "build" in SERVICES[name]


@pytest.mark.parametrize("name", sorted(n for n, s in SERVICES.items() if "build" not in s))
def test_every_image_is_pinned(name: str) -> None:
    image = SERVICES[name]["image"]
    assert ":" in image, f"{name}: {image} has no tag"
    tag = image.rsplit(":", 1)[1]
    assert tag != "latest" and re.search(r"\d+\.\d+", tag), f"{name}: {image} is not pinned"


def test_the_stack_has_every_part() -> None:
    images = {s["image"].rsplit(":", 1)[0] for s in SERVICES.values() if "build" not in s}
    assert {
        "rabbitmq",
        "postgres",
        "otel/opentelemetry-collector-contrib",
        "grafana/tempo",
        "prom/prometheus",
        "grafana/loki",
        "grafana/alloy",
        "grafana/grafana",
    } <= images
    programs = [command_of(s)[:2] for s in PACELINE.values()]
    for kind in ServerKind:
        assert [f"paceline-{kind.value}", "run"] in programs, f"no paceline-{kind.value} run"
    workers = [p for p in programs if p == ["paceline-activity-worker", "run"]]
    assert len(workers) >= 2


def test_the_services_share_one_image_built_with_the_dockerfile() -> None:
    builds = {json.dumps(s["build"], sort_keys=True) for s in PACELINE.values()}
    images = {s.get("image") for s in PACELINE.values()}
    assert len(builds) == 1 and len(images) == 1
    build = next(iter(PACELINE.values()))["build"]
    assert (HERE / build["context"]).resolve() == ROOT
    assert (ROOT / build["dockerfile"]).resolve() == HERE / "Dockerfile"


def test_the_migrations_run_once_before_every_service() -> None:
    migrators = [n for n, s in PACELINE.items() if "migrate" in " ".join(command_of(s))]
    assert len(migrators) == 1
    migrate = migrators[0]
    command = " ".join(command_of(PACELINE[migrate]))
    assert "paceline-scheduler migrate" in command and "paceline-reporting migrate" in command
    assert PACELINE[migrate].get("restart") == "no"
    for name, service in PACELINE.items():
        if name == migrate:
            continue
        depends = service.get("depends_on") or {}
        assert isinstance(depends, dict), f"{name}: depends_on without conditions"
        assert depends.get(migrate, {}).get("condition") == "service_completed_successfully", name


@pytest.mark.parametrize("name", sorted(PACELINE))
def test_the_services_environment_names_are_settings(name: str) -> None:
    env = environment(PACELINE[name])
    unknown = [
        k
        for k in env
        if not (k.startswith("PACELINE_") and k in DOCUMENTED) and k not in OTEL_SDK_VARIABLES
    ]
    assert not unknown, f"{name}: not a setting of docs/settings.md nor an OTel SDK variable"


@pytest.mark.parametrize("name", sorted(PACELINE))
def test_the_services_reach_the_stack_parts(name: str) -> None:
    env = {k: default_of(v) for k, v in environment(PACELINE[name]).items()}
    amqp = urlsplit(env["PACELINE_AMQP_URL"])
    assert amqp.scheme == "amqp" and amqp.hostname in SERVICES
    assert "rabbitmq" in SERVICES[amqp.hostname]["image"]
    for key in ("PACELINE_DATABASE_URL", "PACELINE_REPORTING_DATABASE_URL"):
        db = urlsplit(env[key])
        assert db.scheme == "postgresql" and db.hostname in SERVICES, key
        assert "postgres" in SERVICES[db.hostname]["image"], key
    otlp = urlsplit(env["PACELINE_OTLP_ENDPOINT"])
    # An OTLP/HTTP base URL: the service appends /v1/traces itself.
    assert otlp.path in ("", "/")
    assert otlp.hostname in SERVICES
    assert "opentelemetry-collector" in SERVICES[otlp.hostname]["image"]
    http_receiver = COLLECTOR["receivers"]["otlp"]["protocols"]["http"]["endpoint"]
    assert int(http_receiver.rsplit(":", 1)[1]) == otlp.port
    assert env["OTEL_RESOURCE_ATTRIBUTES"] == "deployment.environment.name=compose"
    assert int(env["OTEL_BSP_SCHEDULE_DELAY"]) <= 1000


def test_the_admin_token_is_required_and_has_no_default() -> None:
    admins = [s for s in PACELINE.values() if command_of(s)[:1] == ["paceline-admin"]]
    assert len(admins) == 1
    token = environment(admins[0])["PACELINE_ADMIN_TOKEN"]
    assert re.fullmatch(r"\$\{PACELINE_ADMIN_TOKEN:\?[^}]+\}", token), token
    assert "PACELINE_ADMIN_TOKEN" not in DOCKERFILE
    others = [n for n, s in PACELINE.items() if "PACELINE_ADMIN_TOKEN" in environment(s)]
    assert len(others) == 1, f"only the admin API needs the token: {others}"


def test_the_admin_port_is_published_and_checked() -> None:
    (admin,) = [s for s in PACELINE.values() if command_of(s)[:1] == ["paceline-admin"]]
    port = environment(admin)["PACELINE_ADMIN_PORT"]
    assert any(p.endswith(f":{port}") for p in admin["ports"])
    assert f"127.0.0.1:{port}/readyz" in " ".join(admin["healthcheck"]["test"])


def test_published_ports_listen_on_localhost_only() -> None:
    ports = [str(p) for s in SERVICES.values() for p in s.get("ports", [])]
    assert ports
    assert all(p.startswith("127.0.0.1:") for p in ports), ports


def test_the_log_label_of_each_service_is_its_trace_service_name() -> None:
    # Alloy makes the label org.paceline.service the Loki label service_name; Grafana finds a
    # span's lines by its service.name, which is paceline-<kind> (paceline_infra.telemetry).
    for name, service in SERVICES.items():
        assert "org.paceline.service" in service.get("labels", {}), f"{name}: not shipped to Loki"
    for name, service in PACELINE.items():
        program = command_of(service)[0]
        label = service["labels"]["org.paceline.service"]
        if program.startswith("paceline-") and command_of(service)[1:2] == ["run"]:
            assert label == program, name
            assert label.removeprefix("paceline-") in {k.value for k in ServerKind}


def test_rabbitmq_consumer_timeout_is_raised() -> None:
    (rabbit,) = [s for s in SERVICES.values() if s.get("image", "").startswith("rabbitmq:")]
    confs = [(src, dst) for src, dst in bind_mounts(rabbit) if dst.startswith("/etc/rabbitmq/")]
    settings: dict[str, str] = {}
    for source, target in confs:
        if target.endswith(".conf"):
            assert target.startswith("/etc/rabbitmq/conf.d/"), "keep the image's own defaults"
            for line in (HERE / source).read_text(encoding="utf-8").splitlines():
                if "=" in line and not line.lstrip().startswith("#"):
                    key, value = (part.strip() for part in line.split("=", 1))
                    settings[key] = value
    # Longer than a day (the default, 30 minutes, would cut long activities short).
    assert int(settings["consumer_timeout"]) >= 24 * 3600 * 1000
    plugins = [src for src, dst in confs if dst == "/etc/rabbitmq/enabled_plugins"]
    assert plugins and "rabbitmq_prometheus" in (HERE / plugins[0]).read_text(encoding="utf-8")


def test_grafana_reads_the_databases_as_the_read_only_role() -> None:
    (postgres,) = [s for s in SERVICES.values() if s.get("image", "").startswith("postgres:")]
    (grafana,) = [s for s in SERVICES.values() if s.get("image", "").startswith("grafana/grafana")]
    init = [src for src, dst in bind_mounts(postgres) if "docker-entrypoint-initdb.d" in dst]
    assert init
    script = (HERE / init[0]).read_text(encoding="utf-8")
    assert os.access(HERE / init[0], os.X_OK), "the postgres image sources a script it cannot run"
    role = re.search(r"CREATE ROLE (\w+) LOGIN", script)
    assert role
    assert "default_transaction_read_only = on" in script
    pg_sources = [d for d in DATASOURCES if "postgres" in d["type"]]
    assert pg_sources
    password_var = "GRAFANA_DB_PASSWORD"
    assert environment(postgres)[password_var] == environment(grafana)[password_var]
    databases = {
        urlsplit(default_of(environment(s)[k])).path.lstrip("/")
        for s in PACELINE.values()
        for k in ("PACELINE_DATABASE_URL", "PACELINE_REPORTING_DATABASE_URL")
    }
    for ds in pg_sources:
        assert ds["user"] == role.group(1)
        assert ds["secureJsonData"]["password"] == f"${{{password_var}}}"
        assert ds["jsonData"]["database"] in databases
        assert f"CREATE DATABASE {ds['jsonData']['database']};" in script


# ---- the OpenTelemetry Collector ----------------------------------------------------------


def test_collector_pipelines_use_only_defined_components() -> None:
    service = COLLECTOR["service"]
    assert set(service.get("extensions", [])) <= set(COLLECTOR.get("extensions", {}))
    assert service["pipelines"]
    for name, pipeline in service["pipelines"].items():
        for kind in ("receivers", "processors", "exporters"):
            used = pipeline.get(kind, [])
            assert set(used) <= set(COLLECTOR.get(kind, {})), f"{name}: {kind} {used}"
        assert pipeline["receivers"] and pipeline["exporters"], name


def test_collector_exports_traces_to_tempo() -> None:
    traces = COLLECTOR["service"]["pipelines"]["traces"]
    tempo_ports = {
        int(p["endpoint"].rsplit(":", 1)[1])
        for p in TEMPO["distributor"]["receivers"]["otlp"]["protocols"].values()
    }
    targets = []
    for exporter in traces["exporters"]:
        endpoint = COLLECTOR["exporters"][exporter]["endpoint"]
        host, port = endpoint.split("://")[-1].split("/")[0].rsplit(":", 1)
        targets.append((host, int(port)))
    assert any(
        host in SERVICES
        and SERVICES[host]["image"].startswith("grafana/tempo:")
        and port in tempo_ports
        for host, port in targets
    ), targets


def test_collector_batches_drops_health_checks_and_polls_and_redacts() -> None:
    processors = COLLECTOR["service"]["pipelines"]["traces"]["processors"]
    assert processors[0] == "memory_limiter" and processors[-1] == "batch"
    filters = [p for p in processors if p.split("/")[0] == "filter"]
    assert filters
    conditions = " ".join(c for p in filters for c in COLLECTOR["processors"][p]["traces"]["span"])
    for needle in ("healthz", "readyz", '"GET"'):
        assert needle in conditions
    assert any(p.split("/")[0] == "redaction" for p in processors)
    redaction = next(COLLECTOR["processors"][p] for p in processors if p.startswith("redaction"))
    blocked = [re.compile(v) for v in redaction["blocked_values"]]
    for secret in ("Bearer 3q2-Xv0123456789abcdef", "amqp://guest:s3cret@rabbitmq:5672/"):
        assert any(b.search(secret) for b in blocked), secret


def test_the_collector_receives_on_every_interface() -> None:
    for protocol in COLLECTOR["receivers"]["otlp"]["protocols"].values():
        assert protocol["endpoint"].startswith("0.0.0.0:")


# ---- Tempo, Prometheus, Loki --------------------------------------------------------------


def test_tempo_generates_service_graphs_and_span_metrics_with_paceline_dimensions() -> None:
    processors = TEMPO["overrides"]["defaults"]["metrics_generator"]["processors"]
    assert {"service-graphs", "span-metrics"} <= set(processors)
    generator = TEMPO["metrics_generator"]
    dimensions = generator["processor"]["span_metrics"]["dimensions"]
    assert {"paceline.step", "paceline.activity.type"} <= set(dimensions)
    # One series per instance would never end: the instance is found through TraceQL instead.
    assert "paceline.instance_id" not in dimensions
    assert "service_graphs" in generator["processor"]
    assert TEMPO["storage"]["trace"]["backend"] == "local"
    (write,) = generator["storage"]["remote_write"]
    url = urlsplit(write["url"])
    assert url.hostname in SERVICES and url.path == "/api/v1/write"
    assert "--web.enable-remote-write-receiver" in command_of(SERVICES[url.hostname])


def test_prometheus_scrapes_only_services_of_the_stack() -> None:
    for job in PROMETHEUS["scrape_configs"]:
        for static in job["static_configs"]:
            for target in static["targets"]:
                host = target.rsplit(":", 1)[0]
                assert host == "localhost" or host in SERVICES, f"{job['job_name']}: {target}"


def test_loki_keeps_structured_metadata() -> None:
    assert LOKI["limits_config"]["allow_structured_metadata"] is True
    assert all(c["schema"] == "v13" for c in LOKI["schema_config"]["configs"])


# ---- the log lines to Loki (Alloy) --------------------------------------------------------


def alloy_strings(key: str) -> list[str]:
    """The values of `key = "..."` in the Alloy config, unescaped."""
    found = re.findall(rf'\b{key}\s*=\s*"((?:[^"\\]|\\.)*)"', ALLOY)
    return [json.loads(f'"{value}"') for value in found]


def alloy_rule(target_label: str) -> dict[str, str]:
    """The relabel rule of the Alloy config that sets `target_label`: its arguments."""
    for body in re.findall(r"\brule\s*\{(.*?)\}", ALLOY, re.S):
        arguments = dict(re.findall(r"^\s*(\w+)\s*=\s*(.+?)\s*$", body, re.M))
        if arguments.get("target_label") == f'"{target_label}"':
            return arguments
    raise AssertionError(f"no rule sets {target_label}")


@pytest.fixture
def log_line() -> str:
    """A line as the services write it (paceline_infra.logs), inside a span: it ends with the
    span's trace and span ids."""
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    try:
        setup_logging("scheduler-abc123-7-f00d42", "INFO")
        formatter = root.handlers[0].formatter
        assert formatter is not None
        record = logging.LogRecord(
            "paceline_scheduler.service", logging.WARNING, __file__, 1, "applied %d", (3,), None
        )
        context = SpanContext(
            int(TRACE_ID, 16), int(SPAN_ID, 16), is_remote=False, trace_flags=TraceFlags(1)
        )
        with trace.use_span(NonRecordingSpan(context)):
            line = formatter.format(record)
    finally:
        root.handlers[:], root.level = saved
    return line


def test_alloy_parses_a_service_log_line(log_line: str) -> None:
    extracted: dict[str, str] = {}
    for expression in alloy_strings("expression"):
        match = re.search(expression, log_line)
        assert match, f"{expression!r} does not match {log_line!r}"
        extracted.update(match.groupdict())
    assert extracted == {
        "level": "WARNING",
        "server": "scheduler-abc123-7-f00d42",
        "logger": "paceline_scheduler.service",
        "trace_id": TRACE_ID,
        "span_id": SPAN_ID,
    }
    (firstline,) = alloy_strings("firstline")
    assert re.search(firstline, log_line)
    assert not re.search(firstline, 'Traceback (most recent call last):\n  File "x.py"')
    (metadata,) = re.findall(r"stage\.structured_metadata\s*\{(.*?)\n  {2,4}\}", ALLOY, re.S)
    assert "trace_id" in metadata and "span_id" in metadata


def test_alloy_reads_the_stack_containers_and_writes_to_loki() -> None:
    (selector,) = alloy_strings("selector")
    label_pattern = re.search(r'service_name=~"(.+)"', selector)
    assert label_pattern
    for name, service in PACELINE.items():
        label = service["labels"]["org.paceline.service"]
        assert re.fullmatch(label_pattern.group(1), label), f"{name}'s lines are not parsed"
    # Every container of the stack is found by its label, whose value is the Loki service_name.
    assert re.search(r'values\s*=\s*\["org\.paceline\.service"\]', ALLOY)
    assert alloy_rule("service_name")["source_labels"] == (
        '["__meta_docker_container_label_org_paceline_service"]'
    )
    (push,) = alloy_strings("url")
    url = urlsplit(push)
    assert url.hostname in SERVICES and SERVICES[url.hostname]["image"].startswith("grafana/loki:")
    assert url.path == "/loki/api/v1/push"
    assert url.port == LOKI["server"]["http_listen_port"]
    (alloy,) = [s for s in SERVICES.values() if s.get("image", "").startswith("grafana/alloy:")]
    sockets = {h.removeprefix("unix://") for h in alloy_strings("host")}
    mounted = {default_of(v).split(":")[1] for v in alloy["volumes"]}
    assert sockets and sockets <= mounted


# ---- Grafana: datasources and the dashboard -----------------------------------------------

DS_BY_UID = {d["uid"]: d for d in DATASOURCES}


def test_every_datasource_has_a_unique_uid_and_a_stack_url() -> None:
    assert len(DS_BY_UID) == len(DATASOURCES)
    for ds in DATASOURCES:
        url = ds["url"] if "://" in ds["url"] else f"tcp://{ds['url']}"
        assert urlsplit(url).hostname in SERVICES, ds["name"]


def test_tempo_and_loki_link_traces_and_logs(log_line: str) -> None:
    tempo = next(d for d in DATASOURCES if d["type"] == "tempo")
    loki = next(d for d in DATASOURCES if d["type"] == "loki")
    prometheus = next(d for d in DATASOURCES if d["type"] == "prometheus")
    to_logs = tempo["jsonData"]["tracesToLogsV2"]
    assert to_logs["datasourceUid"] == loki["uid"]
    assert to_logs["filterByTraceID"] is True
    # The span's service.name is looked up as the Loki label Alloy sets.
    assert {"key": "service.name", "value": "service_name"} in to_logs["tags"]
    assert alloy_rule("service_name")
    assert tempo["jsonData"]["serviceMap"]["datasourceUid"] == prometheus["uid"]
    assert tempo["jsonData"]["tracesToMetrics"]["datasourceUid"] == prometheus["uid"]
    (derived,) = loki["jsonData"]["derivedFields"]
    assert derived["datasourceUid"] == tempo["uid"]
    match = re.search(derived["matcherRegex"], log_line)
    assert match and match.group(1) == TRACE_ID
    # $$ is a literal $ in a provisioning file: Grafana expands ${...} from its environment.
    assert derived["url"] == "$${__value.raw}"
    destinations = prometheus["jsonData"]["exemplarTraceIdDestinations"]
    assert all(d["datasourceUid"] == tempo["uid"] for d in destinations)


def test_the_dashboards_are_provisioned_from_the_mounted_folder() -> None:
    (grafana,) = [s for s in SERVICES.values() if s.get("image", "").startswith("grafana/grafana")]
    mounts = dict(bind_mounts(grafana))
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    (provider,) = PROVIDERS
    assert mounts["./grafana/dashboards"] == provider["options"]["path"]
    home = environment(grafana)["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home.startswith(provider["options"]["path"] + "/")
    assert (HERE / "grafana/dashboards" / Path(home).name).is_file()


def dashboard_panels() -> list[dict[str, Any]]:
    panels = []
    for panel in DASHBOARD["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))
    return panels


def used_datasource_uids() -> set[str]:
    uids: set[str] = set()
    for panel in dashboard_panels():
        uids.add(uid(panel.get("datasource")) or "")
        for target in panel.get("targets", []):
            uids.add(uid(target.get("datasource")) or "")
    for variable in DASHBOARD["templating"]["list"]:
        uids.add(uid(variable.get("datasource")) or "")
    for annotation in DASHBOARD["annotations"]["list"]:
        uids.add(uid(annotation.get("datasource")) or "")
    return uids - {""}


def test_every_datasource_the_dashboard_uses_is_provisioned() -> None:
    used = used_datasource_uids()
    assert used - SPECIAL_DATASOURCES, "the dashboard names no datasource"
    assert used - SPECIAL_DATASOURCES <= set(DS_BY_UID), used - set(DS_BY_UID)
    for panel in dashboard_panels():
        for target in panel.get("targets", []):
            ds = target["datasource"]
            if ds["uid"] in DS_BY_UID:
                assert ds["type"] == DS_BY_UID[ds["uid"]]["type"], panel["title"]


QUERY_FIELDS = {"rawSql", "expr", "query"}


def test_every_panel_has_queries() -> None:
    panels = [p for p in dashboard_panels() if p["type"] != "row"]
    assert len(panels) >= 8
    ids = [p["id"] for p in dashboard_panels()]
    assert len(ids) == len(set(ids))
    for panel in panels:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            has_query = any(str(target.get(f, "")).strip() for f in QUERY_FIELDS)
            assert has_query or target.get("queryType") == "serviceMap", panel["title"]
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]


def test_the_dashboard_shows_what_the_issue_asks() -> None:
    assert DASHBOARD["uid"] == "paceline-processes"
    assert DASHBOARD["title"] == "Paceline processes"
    titles = " | ".join(p["title"].lower() for p in dashboard_panels())
    for needle in ("flagged activities", "failed instances", "redeliveries", "by step"):
        assert needle in titles


def test_the_instance_picker_opens_its_trace() -> None:
    variables = {v["name"]: v for v in DASHBOARD["templating"]["list"]}
    assert "instance" in variables
    assert variables["instance"]["multi"] is False
    traceql = [
        t["query"]
        for p in dashboard_panels()
        for t in p.get("targets", [])
        if t["datasource"]["uid"] in DS_BY_UID
        and DS_BY_UID[t["datasource"]["uid"]]["type"] == "tempo"
        and t.get("queryType") == "traceql"
    ]
    assert any(
        re.search(r'\{\s*span\.paceline\.instance_id\s*=\s*"\$(instance|\{instance\})"\s*\}', q)
        for q in traceql
    ), traceql


SPAN_METRICS_INTRINSIC = {"service", "span_name", "span_kind", "status_code", "le"}


def test_span_metric_labels_the_dashboard_uses_are_tempo_dimensions() -> None:
    dimensions = TEMPO["metrics_generator"]["processor"]["span_metrics"]["dimensions"]
    labels = {re.sub(r"[^A-Za-z0-9_]", "_", d) for d in dimensions} | SPAN_METRICS_INTRINSIC
    exprs = [
        t["expr"]
        for p in dashboard_panels()
        for t in p.get("targets", [])
        if "traces_spanmetrics" in t.get("expr", "")
    ]
    used = {
        label.strip()
        for e in exprs
        for group in re.findall(r"\bby \(([^)]*)\)", e)
        for label in group.split(",")
    } | {label for e in exprs for label in re.findall(r"\b(\w+)=~?\"", e)}
    assert {"paceline_step", "paceline_activity_type", "error_type"} <= used
    assert used <= labels, used - labels
    spans = " ".join(exprs)
    assert 'service="paceline-activity-worker"' in spans and 'span_name=~"activity .+"' in spans


def migration_tables(folder: str) -> set[str]:
    text = " ".join(p.read_text(encoding="utf-8") for p in sorted((ROOT / folder).glob("*.sql")))
    return set(re.findall(r"CREATE TABLE (?:IF NOT EXISTS )?(\w+)", text))


TABLES = {
    "paceline-db": migration_tables("services/scheduler/src/paceline_scheduler/migrations"),
    "paceline-reporting-db": migration_tables(
        "services/reporting/src/paceline_reporting/migrations"
    ),
}


def dashboard_sql() -> list[tuple[str, str, str]]:
    found = [
        (p["title"], t["datasource"]["uid"], t["rawSql"])
        for p in dashboard_panels()
        for t in p.get("targets", [])
        if "rawSql" in t
    ]
    found += [
        (f"variable {v['name']}", v["datasource"]["uid"], v["query"])
        for v in DASHBOARD["templating"]["list"]
        if uid(v.get("datasource")) in TABLES
    ]
    return found


def test_the_dashboard_sql_reads_tables_of_its_database() -> None:
    queries = dashboard_sql()
    assert {ds for _, ds, _ in queries} == set(TABLES)
    for title, ds, sql in queries:
        tables = set(re.findall(r"\b(?:FROM|JOIN)\s+(\w+)", sql))
        assert tables, title
        assert tables <= TABLES[ds], f"{title}: {tables - TABLES[ds]}"


def test_the_dashboard_sql_uses_the_engines_names() -> None:
    statuses = {s.value for s in InstanceStatus} | {s.value for s in ActivityStatus}
    kinds = {k.value for k in HistoryKind}
    for title, _, sql in dashboard_sql():
        for value in re.findall(r"status\s*(?:=|<>)\s*'(\w+)'", sql):
            assert value in statuses, f"{title}: status {value}"
        for group in re.findall(r"status IN \(([^)]*)\)", sql):
            for value in re.findall(r"'(\w+)'", group):
                assert value in statuses, f"{title}: status {value}"
        for value in re.findall(r"kind\s*=\s*'(\w+)'", sql):
            assert value in kinds, f"{title}: history kind {value}"
    every = " ".join(sql for _, _, sql in dashboard_sql())
    for kind in (HistoryKind.REDELIVERED, HistoryKind.FLAGGED, HistoryKind.INSTANCE_FAILED):
        assert f"'{kind.value}'" in every


# ---- the image -----------------------------------------------------------------------------


def test_the_dockerfile_installs_the_locked_workspace() -> None:
    runs = re.findall(r"^RUN (.+)$", DOCKERFILE, re.M)
    syncs = [r for r in runs if r.startswith("uv sync")]
    assert syncs and all("--frozen" in r and "--all-packages" in r for r in syncs)
    assert any("--no-install-workspace" not in r for r in syncs), "the workspace is not installed"
    for image in re.findall(r"^FROM (\S+)", DOCKERFILE, re.M):
        assert re.search(r":\S*\d+\.\d+", image) and not image.endswith(":latest"), image


def test_the_image_uses_the_projects_uv() -> None:
    wanted = re.search(r"^UV_VERSION=(\S+)$", (ROOT / "deploy/ensure-uv.sh").read_text(), re.M)
    assert wanted
    assert f"FROM ghcr.io/astral-sh/uv:{wanted.group(1)} " in DOCKERFILE


def workspace_members() -> list[Path]:
    root = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    members = root["tool"]["uv"]["workspace"]["members"]
    return sorted(p.parent for m in members for p in ROOT.glob(f"{m}/pyproject.toml"))


def test_the_dockerfile_copies_every_workspace_member() -> None:
    copied = set(re.findall(r"^COPY (\S+)/pyproject\.toml ", DOCKERFILE, re.M))
    members = {str(m.relative_to(ROOT)) for m in workspace_members()}
    assert members and members == copied


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern that matches the path (or a folder above it) decides."""
    parts = path.strip("/").split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        glob = pattern.lstrip("!").strip("/")
        if any(fnmatch.fnmatchcase(c, glob) for c in candidates):
            ignored = not negated
    return ignored


def test_the_build_context_holds_what_the_dockerfile_copies() -> None:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert dockerignored(".venv/bin/python", patterns)
    assert dockerignored(".paceline/compose.env", patterns), "the token file must stay out"
    sources = [
        src
        for line in re.findall(r"^COPY (?!--from)(.+)$", DOCKERFILE, re.M)
        for src in line.split()[:-1]
    ]
    assert sources
    for source in sources:
        assert (ROOT / source).exists(), source
        assert not dockerignored(source, patterns), f"{source} is left out of the context"


# ---- make up / make down -------------------------------------------------------------------


def test_make_up_and_down_run_the_scripts() -> None:
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    phony = re.search(r"^\.PHONY:(.*)$", makefile, re.M)
    assert phony and {"up", "down"} <= set(phony.group(1).split())
    for target, script in (("up", "up.sh"), ("down", "down.sh")):
        rule = re.search(rf"^{target}:.*\n((?:\t.*\n)+)", makefile, re.M)
        assert rule, f"no recipe for make {target}"
        assert f"deploy/compose/{script}" in rule.group(1)


def fake_program(folder: Path, name: str, body: str) -> None:
    path = folder / name
    path.write_text(f"#!/usr/bin/env bash\n{body}\n", encoding="utf-8")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


FAILING_DAEMON = (
    'echo "Cannot connect to the Docker daemon at unix:///fake/docker.sock. '
    'Is the docker daemon running?" >&2; exit 1'
)


def run_script(
    script: str, fakes: Path, tmp_path: Path, *args: str, **env: str
) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("PACELINE_")}
    base.update(
        PATH=f"{fakes}{os.pathsep}{os.environ['PATH']}",
        STACK_ENV_FILE=str(tmp_path / "state" / "compose.env"),
        UP_TIMEOUT="10",
        GRAFANA_PORT="3000",
    )
    base.update(env)
    return subprocess.run(
        ["bash", str(HERE / script), *args],
        capture_output=True,
        text=True,
        env=base,
        timeout=60,
    )


@pytest.fixture
def no_engine(tmp_path: Path) -> Path:
    """docker and podman exist, and neither answers."""
    fakes = tmp_path / "bin"
    fakes.mkdir()
    fake_program(fakes, "docker", FAILING_DAEMON)
    fake_program(fakes, "podman", 'echo "Error: unable to connect to Podman socket" >&2; exit 125')
    fake_program(fakes, "docker-compose", "exit 1")
    fake_program(fakes, "podman-compose", "exit 1")
    return fakes


@pytest.mark.parametrize("script", ["up.sh", "down.sh"])
def test_without_a_container_engine_the_scripts_say_so(
    script: str, no_engine: Path, tmp_path: Path
) -> None:
    result = run_script(script, no_engine, tmp_path)
    assert result.returncode != 0
    target = "make up" if script == "up.sh" else "make down"
    assert f"{target} needs a running container engine" in result.stderr
    assert "Cannot connect to the Docker daemon at unix:///fake/docker.sock" in result.stderr
    assert "unable to connect to Podman socket" in result.stderr
    assert "`make run`" in result.stderr
    assert not (tmp_path / "state").exists(), "no token is generated for a stack that won't run"


def test_docker_without_compose_is_named(no_engine: Path, tmp_path: Path) -> None:
    fake_program(no_engine, "docker", 'case "$1" in info) exit 0 ;; *) exit 1 ;; esac')
    result = run_script("up.sh", no_engine, tmp_path)
    assert result.returncode != 0
    assert "docker answers, but has no compose" in result.stderr


class _Ready(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200 if self.path == "/readyz" else 404)
        self.end_headers()
        self.wfile.write(b'{"status": "ok"}')

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def admin_ready() -> Iterator[int]:
    """An admin API that answers /readyz on a free port of 127.0.0.1."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Ready)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def docker_answers(tmp_path: Path) -> tuple[Path, Path]:
    """A docker whose daemon and compose answer; each compose call is logged with the token
    it was given."""
    fakes = tmp_path / "bin"
    fakes.mkdir()
    calls = tmp_path / "compose-calls"
    fake_program(
        fakes,
        "docker",
        f"""case "$1 $2" in
  "info "*) exit 0 ;;
  "compose version") echo "Docker Compose version v2.40.0"; exit 0 ;;
  "compose "*) echo "$* token=${{PACELINE_ADMIN_TOKEN:-}}" >> {calls}; exit 0 ;;
esac
exit 1""",
    )
    return fakes, calls


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_make_up_generates_a_token_keeps_it_and_prints_where_to_go(
    docker_answers: tuple[Path, Path], admin_ready: int, tmp_path: Path
) -> None:
    fakes, calls = docker_answers
    first = run_script("up.sh", fakes, tmp_path, PACELINE_ADMIN_PORT=str(admin_ready))
    assert first.returncode == 0, first.stderr
    env_file = tmp_path / "state" / "compose.env"
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
    token = re.search(r"^PACELINE_ADMIN_TOKEN=(\S+)$", env_file.read_text(), re.M)
    assert token and len(token.group(1)) >= 16
    assert f"API token: {token.group(1)}" in first.stdout
    assert f"admin API: http://127.0.0.1:{admin_ready}" in first.stdout
    assert "Grafana: http://127.0.0.1:3000/d/paceline-processes" in first.stdout
    (call,) = calls.read_text().splitlines()
    assert call.startswith(f"compose -p paceline -f {COMPOSE_FILE} up -d --build")
    assert call.endswith(f"token={token.group(1)}")

    second = run_script("up.sh", fakes, tmp_path, PACELINE_ADMIN_PORT=str(admin_ready))
    assert second.returncode == 0, second.stderr
    assert f"API token: {token.group(1)}" in second.stdout


def test_make_up_never_prints_a_token_of_yours(
    docker_answers: tuple[Path, Path], admin_ready: int, tmp_path: Path
) -> None:
    fakes, calls = docker_answers
    mine = "mine-0123456789-abcdef"
    result = run_script(
        "up.sh", fakes, tmp_path, PACELINE_ADMIN_PORT=str(admin_ready), PACELINE_ADMIN_TOKEN=mine
    )
    assert result.returncode == 0, result.stderr
    assert mine not in result.stdout + result.stderr
    assert "API token: yours, PACELINE_ADMIN_TOKEN" in result.stdout
    assert calls.read_text().strip().endswith(f"token={mine}")
    assert not (tmp_path / "state" / "compose.env").exists()


def test_make_up_refuses_a_short_token(docker_answers: tuple[Path, Path], tmp_path: Path) -> None:
    fakes, calls = docker_answers
    result = run_script("up.sh", fakes, tmp_path, PACELINE_ADMIN_TOKEN="short")
    assert result.returncode != 0
    assert "PACELINE_ADMIN_TOKEN: use at least 16 characters" in result.stderr
    assert not calls.exists(), "nothing is started"


def test_make_up_says_when_the_admin_api_never_gets_ready(
    docker_answers: tuple[Path, Path], tmp_path: Path
) -> None:
    fakes, _ = docker_answers
    result = run_script(
        "up.sh", fakes, tmp_path, PACELINE_ADMIN_PORT=str(free_port()), UP_TIMEOUT="1"
    )
    assert result.returncode != 0
    assert "the admin API was not ready after 1s" in result.stderr


def test_make_down_keeps_the_data_unless_asked(
    docker_answers: tuple[Path, Path], tmp_path: Path
) -> None:
    fakes, calls = docker_answers
    kept = run_script("down.sh", fakes, tmp_path)
    assert kept.returncode == 0, kept.stderr
    deleted = run_script("down.sh", fakes, tmp_path, "--volumes")
    assert deleted.returncode == 0, deleted.stderr
    keep_call, delete_call = calls.read_text().splitlines()
    assert keep_call.startswith(f"compose -p paceline -f {COMPOSE_FILE} down")
    assert "--volumes" not in keep_call and "--volumes" in delete_call
    assert "its data is kept" in kept.stdout


# ---- a compose implementation, where one answers ----------------------------------------


def compose_command() -> list[str] | None:
    candidates = [["docker", "compose"], ["docker-compose"]]
    for command in candidates:
        if shutil.which(command[0]) is None:
            continue
        try:
            result = subprocess.run(
                [*command, "version"], capture_output=True, text=True, timeout=30
            )
        except (OSError, subprocess.TimeoutExpired):
            continue
        if result.returncode == 0:
            return command
    return None


COMPOSE_COMMAND = compose_command()
needs_compose = pytest.mark.skipif(
    COMPOSE_COMMAND is None,
    reason="no compose implementation answers here (neither `docker compose version` nor "
    "`docker-compose version`): the file is not validated by compose",
)


@needs_compose
def test_compose_validates_the_file() -> None:
    assert COMPOSE_COMMAND is not None
    env = {k: v for k, v in os.environ.items() if not k.startswith("PACELINE_")}
    config = [*COMPOSE_COMMAND, "-p", "paceline", "-f", str(COMPOSE_FILE), "config", "-q"]
    result = subprocess.run(
        config,
        capture_output=True,
        text=True,
        timeout=60,
        env={**env, "PACELINE_ADMIN_TOKEN": "a-token-for-config-only"},
    )
    assert result.returncode == 0, result.stderr
    without_token = subprocess.run(config, capture_output=True, text=True, timeout=60, env=env)
    assert without_token.returncode != 0
    assert "PACELINE_ADMIN_TOKEN" in without_token.stderr
