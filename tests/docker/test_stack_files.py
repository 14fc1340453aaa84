"""The Docker stack's files (docker/), checked without a Docker engine.

Compose, Prometheus and Grafana files must parse and agree with each other (services, volumes,
ports, mount paths); the commands the image and compose run must be accepted by the real
``adpredict`` argument parser; every metric a rule or dashboard reads must be documented in
docs/METRICS.md or be a recording rule; the image's health check must tell a SERVING gRPC server
from one that is not.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import socket
import subprocess
import sys
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from adpredict.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
COMPOSE = DOCKER / "compose.yaml"
DOCKERFILE = DOCKER / "Dockerfile"
DOCKERIGNORE = DOCKER / "Dockerfile.dockerignore"
HEALTHCHECK = DOCKER / "healthcheck.py"
PROMETHEUS_CONFIG = DOCKER / "prometheus" / "prometheus.yml"
RULES_DIR = DOCKER / "prometheus" / "rules"
GRAFANA = DOCKER / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "adpredict.json"
METRICS_DOC = ROOT / "docs" / "METRICS.md"

METRIC_TOKEN = re.compile(r"(?<![\w:])adpredict_[a-z_]+")
RECORDED_TOKEN = re.compile(r"(?<![\w:])adpredict:[a-z0-9_:]+")
SELECTOR = re.compile(r"(?<![\w:])(adpredict_[a-z_]+)\{([^}]*)\}")
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
SCRAPE_LABELS = {"job", "instance"}


# ---- helpers -----------------------------------------------------------------------------------
def load_yaml(path: Path) -> Any:
    """Parse one YAML file."""
    return yaml.safe_load(path.read_text())


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    """docker/compose.yaml, parsed."""
    return load_yaml(COMPOSE)


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No ADPREDICT_* variable of this shell leaks into argument parsing."""
    for var in [v for v in os.environ if v.startswith("ADPREDICT_")]:
        monkeypatch.delenv(var)


def parse_cli(argv: list[str]) -> Any:
    """Parse ``adpredict ARGV`` with the real parser; a rejected command fails the test."""
    try:
        return build_parser().parse_args(argv)
    except SystemExit:
        pytest.fail(f"adpredict rejects: {shlex.join(argv)}")


def serve_dests() -> set[str]:
    """Destinations of every ``adpredict serve`` option (what ADPREDICT_* variables set)."""
    parser = build_parser()
    (subparsers,) = (a for a in parser._actions if isinstance(a.choices, dict))
    serve = subparsers.choices["serve"]
    return {a.dest for a in serve._actions if a.option_strings and a.dest != "help"}


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of docker/Dockerfile, continuation lines joined."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        pending += line
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        word, _, rest = pending.partition(" ")
        out.append((word.upper(), rest.strip()))
        pending = ""
    assert not pending, "Dockerfile ends inside a continued line"
    return out


def instruction(name: str) -> list[str]:
    """Arguments of every ``name`` instruction of the Dockerfile, in order."""
    return [args for word, args in dockerfile_instructions() if word == name]


def documented_metrics() -> dict[str, str]:
    """Metric name -> type ("counter", "gauge", "histogram") from the tables of docs/METRICS.md."""
    metrics = {}
    for line in METRICS_DOC.read_text().splitlines():
        match = re.match(r"\|\s*`(adpredict_[a-z_]+)`\s*\|\s*(\w+)", line)
        if match:
            metrics[match.group(1)] = match.group(2)
    return metrics


def documented_labels() -> dict[str, set[str]]:
    """Metric name -> its labels, from the tables of docs/METRICS.md."""
    labels = {}
    for line in METRICS_DOC.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 3 and re.fullmatch(r"`adpredict_[a-z_]+`", cells[0]):
            labels[cells[0].strip("`")] = set(re.findall(r"`(\w+)`", cells[2]))
    return labels


def rule_groups() -> Iterator[dict[str, Any]]:
    """Every rule of every rules file."""
    for path in sorted(RULES_DIR.glob("*.yml")):
        for group in load_yaml(path)["groups"]:
            yield from group["rules"]


def recorded_names() -> set[str]:
    """Names of every recording rule."""
    return {rule["record"] for rule in rule_groups() if "record" in rule}


def dashboard() -> dict[str, Any]:
    """The provisioned dashboard, parsed."""
    return json.loads(DASHBOARD.read_text())


def dashboard_panels() -> list[dict[str, Any]]:
    """Every panel of the dashboard, rows' nested panels included."""
    panels = []
    for panel in dashboard()["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))
    return panels


def dashboard_exprs() -> list[str]:
    """Every PromQL expression of the dashboard: panel targets and variable queries."""
    exprs = [t["expr"] for p in dashboard_panels() for t in p.get("targets", [])]
    for var in dashboard()["templating"]["list"]:
        query = var.get("query")
        if var["type"] == "query":
            exprs.append(query["query"] if isinstance(query, dict) else query)
    return exprs


def rule_exprs() -> list[str]:
    """Every expression of every recording and alerting rule."""
    return [rule["expr"] for rule in rule_groups()]


def metric_name(token: str, metrics: dict[str, str]) -> str:
    """The documented metric a series name belongs to (a histogram's _bucket/_sum/_count)."""
    for suffix in HISTOGRAM_SUFFIXES:
        base = token.removesuffix(suffix)
        if base != token and metrics.get(base) == "histogram":
            return base
    return token


def mounts(service: dict[str, Any]) -> list[tuple[str, str]]:
    """(source, target) of a compose service's short-syntax volumes, ":ro" dropped."""
    out = []
    for spec in service.get("volumes", []):
        source, target, *_ = spec.split(":")
        out.append((source, target))
    return out


def bind_source(source: str) -> Path | None:
    """The host path of a bind mount (relative to docker/), None for a named volume."""
    return (DOCKER / source).resolve() if source.startswith((".", "/")) else None


def container_path(service: dict[str, Any], path: str) -> Path | None:
    """The host path behind ``path`` inside a service's container, if a bind mount provides it."""
    for source, target in mounts(service):
        host = bind_source(source)
        if host is not None and (path == target or path.startswith(target.rstrip("/") + "/")):
            return host / os.path.relpath(path, target)
    return None


def option(argv: list[str], flag: str) -> str:
    """The value of ``flag`` in an argv list (``--flag VALUE`` or ``--flag=VALUE``)."""
    for i, arg in enumerate(argv):
        if arg == flag:
            return argv[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    raise AssertionError(f"{flag} not in {argv}")


def published(service: dict[str, Any]) -> dict[int, tuple[str, int]]:
    """Container port -> (host address, host port) of a service's published ports."""
    out = {}
    for spec in service.get("ports", []):
        address, host, container = str(spec).split(":")
        out[int(container)] = (address, int(host))
    return out


# ---- compose -----------------------------------------------------------------------------------
def test_compose_services_and_images(compose: dict[str, Any]) -> None:
    """The four services exist; third-party images are pinned; adpredict builds from the repo."""
    services = compose["services"]
    assert set(services) == {"demo-model", "adpredict", "prometheus", "grafana"}
    for name, service in services.items():
        image = service["image"]
        repo, _, tag = image.rpartition(":")
        assert repo and tag and tag != "latest", f"{name}: image {image!r} is not pinned"
        if "build" in service:
            build = service["build"]
            assert (DOCKER / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE
        else:
            assert re.fullmatch(r"v?\d+\.\d+\.\d+", tag), f"{name}: {image!r} needs a version tag"


def test_compose_volumes_and_dependencies(compose: dict[str, Any]) -> None:
    """Named volumes are declared, bind mounts exist, depends_on names real services."""
    services = compose["services"]
    declared = set(compose.get("volumes") or {})
    used = set()
    for name, service in services.items():
        for source, target in mounts(service):
            assert target.startswith("/"), f"{name}: mount target {target!r}"
            host = bind_source(source)
            if host is None:
                assert source in declared, f"{name}: volume {source!r} is not declared"
                used.add(source)
            else:
                assert host.exists(), f"{name}: bind mount source {source} does not exist"
        depends = service.get("depends_on", [])
        assert set(depends) <= set(services) - {name}, f"{name}: depends_on {depends}"
    assert used == declared, f"declared but unused volumes: {declared - used}"


def test_compose_ports_are_unique_and_loopback_only(compose: dict[str, Any]) -> None:
    """No two services publish the same host port; nothing listens beyond 127.0.0.1."""
    host_ports = []
    for name, service in compose["services"].items():
        for address, host_port in published(service).values():
            assert address == "127.0.0.1", f"{name} publishes on {address}"
            host_ports.append(host_port)
    assert len(host_ports) == len(set(host_ports)), host_ports


def test_compose_adpredict_serves_the_demo_model(
    compose: dict[str, Any], clean_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server command and its ADPREDICT_* variables are valid serve options; it waits for
    the demo model, reads the volume the demo model is trained into, and publishes both ports."""
    services = compose["services"]
    server = services["adpredict"]
    env = {k: str(v) for k, v in (server.get("environment") or {}).items()}
    dests = serve_dests()
    for var in env:
        assert var.startswith("ADPREDICT_"), var
        assert var.removeprefix("ADPREDICT_").lower() in dests, f"{var} sets no serve option"
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    argv = server["command"]
    args = parse_cli(argv)
    assert args.command == "serve"
    assert args.host == "0.0.0.0"
    for var, value in env.items():
        dest = var.removeprefix("ADPREDICT_").lower()
        assert str(getattr(args, dest)) in (value, str(float(value))), var
    ports = published(server)
    assert args.port in ports and args.metrics_port in ports

    assert server["depends_on"]["demo-model"]["condition"] == "service_completed_successfully"
    server_models = dict((t, s) for s, t in mounts(server))[args.model_dir]
    demo = services["demo-model"]
    assert dict(mounts(demo))[server_models] == args.model_dir


def test_compose_demo_model_commands_are_valid(compose: dict[str, Any], clean_env: None) -> None:
    """Each adpredict command of the one-shot demo-model script parses, and train writes a
    model NAME directory directly under the model dir the server serves."""
    demo = compose["services"]["demo-model"]
    assert demo["entrypoint"][0] == "/bin/sh"
    (script,) = demo["command"]
    commands = [
        shlex.split(line.strip())
        for line in script.splitlines()
        if line.strip().startswith("adpredict ")
    ]
    parsed = [parse_cli(argv[1:]) for argv in commands]
    assert [args.command for args in parsed] == ["synth", "train"]
    synth, train = parsed
    assert train.data == synth.out
    serve_dir = parse_cli(compose["services"]["adpredict"]["command"]).model_dir
    assert Path(train.model_dir).parent == Path(serve_dir)
    # The skip-if-present test looks where train writes versions.
    assert f"{train.model_dir}/[0-9]*" in script


# ---- Dockerfile --------------------------------------------------------------------------------
def test_dockerfile_base_user_healthcheck_entrypoint(clean_env: None) -> None:
    """Slim Python 3.11 base, a non-root user, a gRPC health check, the adpredict entrypoint
    and a default CMD the real parser accepts (serve on all interfaces, metrics on 9090)."""
    bases = instruction("FROM")
    assert bases and all(re.match(r"python:3\.11[\d.]*-slim", b) for b in bases), bases
    user = instruction("USER")[-1].split(":")[0]
    assert user not in ("root", "0"), "the image must not run as root"
    (healthcheck,) = instruction("HEALTHCHECK")
    assert "CMD" in healthcheck and "healthcheck.py" in healthcheck
    (entrypoint,) = instruction("ENTRYPOINT")
    assert json.loads(entrypoint) == ["adpredict"]
    (cmd,) = instruction("CMD")
    args = parse_cli(json.loads(cmd))
    assert (args.command, args.host, args.metrics_port) == ("serve", "0.0.0.0", 9090)
    exposed = {int(p) for line in instruction("EXPOSE") for p in line.split()}
    assert {args.port, args.metrics_port} <= exposed
    assert any("pip wheel" in run and " ." in run for run in instruction("RUN"))


def test_dockerfile_copies_what_the_context_sends() -> None:
    """Every COPY source exists in the repository and is not excluded by the .dockerignore."""
    sources = []
    for args in instruction("COPY"):
        if "--from=" in args:
            continue
        *srcs, _dest = args.split()
        sources.extend(srcs)
    assert "docker/healthcheck.py" in sources
    patterns = [line for line in DOCKERIGNORE.read_text().splitlines() if line.startswith("!")]
    for src in sources:
        assert (ROOT / src).exists(), f"COPY {src}: not in the repository"
        assert any(src.rstrip("/") == p[1:].rstrip("/") for p in patterns), f"{src} ignored"
    rules = [
        line for line in DOCKERIGNORE.read_text().splitlines() if line and not line.startswith("#")
    ]
    assert rules[0] == "*", "the context must start empty and re-include what COPY needs"


# ---- the health check script -------------------------------------------------------------------
@pytest.fixture
def health_server() -> Iterator[tuple[int, health.HealthServicer]]:
    """A real gRPC server on loopback with only the standard health service."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield port, servicer
    finally:
        server.stop(grace=None)


def run_healthcheck(*args: str, env: dict[str, str] | None = None) -> int:
    """Exit status of docker/healthcheck.py."""
    return subprocess.run(
        [sys.executable, str(HEALTHCHECK), *args],
        env={**os.environ, **(env or {})},
        capture_output=True,
        timeout=30,
    ).returncode


def test_healthcheck_follows_grpc_health(
    health_server: tuple[int, health.HealthServicer],
) -> None:
    """Exit 0 while the server reports SERVING (target from argv or ADPREDICT_PORT), 1 while it
    reports NOT_SERVING."""
    port, servicer = health_server
    status = health_pb2.HealthCheckResponse
    servicer.set("", status.SERVING)
    assert run_healthcheck(f"127.0.0.1:{port}") == 0
    assert run_healthcheck(env={"ADPREDICT_PORT": str(port)}) == 0
    servicer.set("", status.NOT_SERVING)
    assert run_healthcheck(f"127.0.0.1:{port}") == 1


def test_healthcheck_fails_when_nothing_listens() -> None:
    """Exit 1 when no server answers."""
    with socket.socket() as probe:  # a free port, released before the check runs
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    assert run_healthcheck(f"127.0.0.1:{port}") == 1


# ---- Prometheus --------------------------------------------------------------------------------
def test_prometheus_config_rules_and_scrape_target(
    compose: dict[str, Any], clean_env: None
) -> None:
    """rule_files (relative to the config) match the rules files, also at the container paths
    compose mounts; the adpredict job scrapes the adpredict service's metrics port."""
    config = load_yaml(PROMETHEUS_CONFIG)
    found = {p for pattern in config["rule_files"] for p in PROMETHEUS_CONFIG.parent.glob(pattern)}
    assert found == set(RULES_DIR.glob("*.yml")) and found

    prometheus = compose["services"]["prometheus"]
    config_flag = next(a for a in prometheus["command"] if a.startswith("--config.file="))
    config_in_container = config_flag.split("=", 1)[1]
    assert container_path(prometheus, config_in_container) == PROMETHEUS_CONFIG
    for pattern in config["rule_files"]:
        in_container = str(Path(config_in_container).parent / Path(pattern).parent)
        assert container_path(prometheus, in_container) == RULES_DIR

    (job,) = (j for j in config["scrape_configs"] if j["job_name"] == "adpredict")
    (target,) = (t for sc in job["static_configs"] for t in sc["targets"])
    host, port = target.split(":")
    assert host in compose["services"]
    serve = parse_cli(compose["services"][host]["command"])
    assert int(port) == serve.metrics_port
    assert all('job="adpredict"' in e for e in rule_exprs() if "up{" in e)


def test_promtool_check_config(promtool: str) -> None:
    """``promtool check config`` accepts the config and the rule files it names."""
    result = subprocess.run(
        [promtool, "check", "config", str(PROMETHEUS_CONFIG)],
        cwd="/",  # rule_files resolve against the config file, not the working directory
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 rule files found" in result.stdout


# ---- Grafana -----------------------------------------------------------------------------------
def test_grafana_provisioning(compose: dict[str, Any]) -> None:
    """The datasource points at the Prometheus service; the dashboard provider's path is the
    mounted dashboards directory; provisioning is mounted where Grafana reads it."""
    grafana = compose["services"]["grafana"]
    provisioning = container_path(grafana, "/etc/grafana/provisioning")
    assert provisioning == GRAFANA / "provisioning"

    files = sorted(provisioning.rglob("*.yml"))
    assert {f.parent.name for f in files} == {"datasources", "dashboards"}
    (datasource,) = load_yaml(provisioning / "datasources" / "prometheus.yml")["datasources"]
    assert datasource["type"] == "prometheus" and datasource["isDefault"] is True
    match = re.fullmatch(r"http://([\w-]+):(\d+)", datasource["url"])
    assert match, datasource["url"]
    assert match.group(1) == "prometheus" and match.group(1) in compose["services"]
    # Prometheus listens on its default 9090 (no --web.listen-address), the port it publishes.
    prometheus = compose["services"]["prometheus"]
    assert not any(a.startswith("--web.listen-address") for a in prometheus["command"])
    assert int(match.group(2)) == 9090 and 9090 in published(prometheus)

    (provider,) = load_yaml(provisioning / "dashboards" / "adpredict.yml")["providers"]
    assert provider["type"] == "file"
    dashboards_dir = container_path(grafana, provider["options"]["path"])
    assert dashboards_dir is not None and (dashboards_dir / DASHBOARD.name).samefile(DASHBOARD)
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    home_file = container_path(grafana, home)
    assert home_file is not None and home_file.samefile(DASHBOARD)


def test_dashboard_structure() -> None:
    """Valid JSON with a stable uid, a recent schema, a datasource variable used by every panel,
    unique panel ids and titles, and no two panels on the same spot."""
    dash = dashboard()
    assert dash["uid"] == "adpredict-overview"
    assert dash["schemaVersion"] >= 36
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"

    panels = dashboard_panels()
    ids = [p["id"] for p in panels]
    titles = [p["title"] for p in panels]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    assert len(titles) == len(set(titles)), "duplicate panel titles"
    for panel in panels:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], f"{panel['title']}: no query"
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]
            assert target["expr"].strip(), panel["title"]
        assert panel.get("description"), f"{panel['title']}: no description"

    cells: dict[tuple[int, int], str] = {}
    for panel in panels:
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24, panel["title"]
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                other = cells.setdefault((x, y), panel["title"])
                assert other == panel["title"], f"{panel['title']} overlaps {other}"


def test_dashboard_has_the_issue_panels() -> None:
    """Each view issue 4 asks for reads its metric or recording rule somewhere."""
    text = "\n".join(dashboard_exprs())
    for needed in [
        "adpredict:predictions:rate5m",
        "adpredict:predict_requests:rate5m",
        "adpredict:request_latency_seconds:p50_5m",
        "adpredict:request_latency_seconds:p99_5m",
        "adpredict:request_latency_seconds:p999_5m",
        "adpredict:sla_seconds",
        "adpredict:timeouts:rate5m",
        "adpredict_batch_predictions_bucket",
        "adpredict:compute_calls:rate5m",
        "adpredict:compute_calls_per_request:rate5m",
        "adpredict_queue_depth_requests",
        "adpredict:cpu_seconds_per_prediction:rate5m",
        "adpredict_model_version",
        "adpredict_model_load_failures_total",
    ]:
        assert needed in text, f"no panel reads {needed}"
    heatmaps = [p for p in dashboard_panels() if p["type"] == "heatmap"]
    assert heatmaps and all(t.get("format") == "heatmap" for p in heatmaps for t in p["targets"])


# ---- metric names: docs/METRICS.md is the contract ---------------------------------------------
def test_metrics_doc_parses() -> None:
    """The contract's tables yield the metrics these checks rely on (guards the parsing)."""
    metrics = documented_metrics()
    assert len(metrics) >= 25
    assert metrics["adpredict_request_duration_seconds"] == "histogram"
    assert metrics["adpredict_timeouts_total"] == "counter"
    assert documented_labels()["adpredict_timeouts_total"] == {"model", "stage"}


@pytest.mark.parametrize("source", ["rules", "dashboard"])
def test_every_metric_is_documented_or_recorded(source: str) -> None:
    """Every adpredict_* series an expression reads is in docs/METRICS.md (histograms through
    their _bucket/_sum/_count series), and every adpredict:* name is a recording rule."""
    exprs = rule_exprs() if source == "rules" else dashboard_exprs()
    metrics = documented_metrics()
    recorded = recorded_names()
    text = "\n".join(exprs)
    tokens = set(METRIC_TOKEN.findall(text))
    assert tokens, "no adpredict_ metric found: the extraction is broken"
    unknown = {t for t in tokens if metric_name(t, metrics) not in metrics}
    assert not unknown, f"not in docs/METRICS.md: {sorted(unknown)}"
    undefined = set(RECORDED_TOKEN.findall(text)) - recorded
    assert not undefined, f"not a recording rule: {sorted(undefined)}"


@pytest.mark.parametrize("source", ["rules", "dashboard"])
def test_selector_labels_are_documented(source: str) -> None:
    """Label matchers on adpredict_* series use only that metric's documented labels (plus le
    on histogram buckets and Prometheus's job/instance)."""
    exprs = rule_exprs() if source == "rules" else dashboard_exprs()
    metrics = documented_metrics()
    labels = documented_labels()
    checked = 0
    for expr in exprs:
        for token, matchers in SELECTOR.findall(expr):
            name = metric_name(token, metrics)
            assert name in labels, f"{token}: not in docs/METRICS.md"
            allowed = (
                labels[name] | SCRAPE_LABELS | ({"le"} if token.endswith("_bucket") else set())
            )
            used = set(re.findall(r"(\w+)\s*[=!]~?", matchers))
            assert used <= allowed, f"{token}{{{matchers}}}: {used - allowed} not documented"
            checked += 1
    assert checked, "no label matcher found: the extraction is broken"
