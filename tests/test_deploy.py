"""The deployment and observability files (deploy/, grafana/) checked without any service.

They parse; promtool accepts the alert rules and the Prometheus configuration, and the rules
behave as documented on synthetic series (promtool's rule unit tests); every ``BGTRANSFER_*``
variable they set is a real setting with a valid value; every command they run is a
``bgtransfer`` subcommand with options that exist; every metric the dashboard and the alerts use
is one the code exports, aggregated the way its source requires. tests/test_prometheus.py runs
the same expressions against a real Prometheus scraping a real worker.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import click
import pytest
import yaml

from bgtransfer import Settings
from bgtransfer._settings import load
from bgtransfer.cli import main

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
GRAFANA = ROOT / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "bgtransfer.json"
DATASOURCES = GRAFANA / "provisioning" / "datasources" / "prometheus.yml"
DASHBOARD_PROVIDERS = GRAFANA / "provisioning" / "dashboards" / "bgtransfer.yml"
PROMETHEUS_YML = DEPLOY / "prometheus" / "prometheus.yml"
ALERTS_YML = DEPLOY / "prometheus" / "alerts.yml"
COMPOSE = DEPLOY / "docker-compose.yml"
DOCKERFILE = DEPLOY / "Dockerfile"
SYSTEMD_UNIT = DEPLOY / "systemd" / "bgtransfer-worker@.service"
K8S = DEPLOY / "k8s"
METRICS_PORT = 9808

# Every series bgtransfer exports, with its labels (bgtransfer/_metrics.py).
WORKER_METRICS = {  # counted in each worker's pool: summed over instances
    "bgtransfer_transfer_bytes_total": {"device", "app", "direction"},
    "bgtransfer_completions_total": {"device", "app", "direction", "outcome"},
    "bgtransfer_transfer_duration_seconds": {"device", "direction", "outcome"},
    "bgtransfer_transfer_rate_bytes_per_second": {"device", "direction"},
    "bgtransfer_pauses_total": {"device", "app", "reason"},
    "bgtransfer_retries_total": {"device", "app", "reason"},
    "bgtransfer_resumed_bytes_total": {"device", "app"},
    "bgtransfer_degraded_downloads_total": {"device", "app", "reason"},
}
STORE_METRICS = {  # device-wide, read from the state store: the same on every worker of a device
    "bgtransfer_requests": {"device", "app", "status"},
    "bgtransfer_device_active_transfers": {"device"},
    "bgtransfer_device_max_concurrent_transfers": {"device"},
    "bgtransfer_admission_decisions_total": {"device", "decision", "reason"},
    "bgtransfer_lease_reclaims_total": {"device"},
    "bgtransfer_store_up": {"device"},
    "bgtransfer_app_daily_bytes": {"device", "app"},
    "bgtransfer_app_daily_quota_bytes": {"device", "app"},
}
HISTOGRAMS = {"bgtransfer_transfer_duration_seconds", "bgtransfer_transfer_rate_bytes_per_second"}
METRIC_LABELS: dict[str, set[str]] = {**WORKER_METRICS, **STORE_METRICS}
for _h in HISTOGRAMS:
    _labels = METRIC_LABELS.pop(_h)
    METRIC_LABELS.update({f"{_h}_bucket": _labels | {"le"}, f"{_h}_sum": _labels, f"{_h}_count": _labels})
METRIC_NAME = re.compile(r"\bbgtransfer_[a-z_]+")
ENV_NAME = re.compile(r"\bBGTRANSFER_[A-Z0-9_]+\b")
# Read directly from the environment rather than through Settings.
EXTRA_ENV = {"BGTRANSFER_METRICS_ADDR", "BGTRANSFER_APP"}


def setting_names() -> set[str]:
    return {f"BGTRANSFER_{f.name.upper()}" for f in dataclasses.fields(Settings)} | EXTRA_ENV


def yaml_files() -> list[Path]:
    return sorted(p for base in (DEPLOY, GRAFANA) for p in base.rglob("*") if p.suffix in (".yml", ".yaml"))


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def k8s_docs() -> list[dict[str, Any]]:
    docs = []
    for path in sorted(K8S.glob("*.y*ml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def dashboard_exprs() -> list[str]:
    """Every PromQL expression of the dashboard's panels (rows included, for collapsed ones)."""
    exprs = []
    for panel in dashboard()["panels"]:
        for p in [panel, *panel.get("panels", [])]:
            exprs += [t["expr"] for t in p.get("targets", [])]
    return exprs


def variable_queries() -> dict[str, str]:
    return {v["name"]: v["query"]["query"] for v in dashboard()["templating"]["list"]}


def alert_rules() -> list[dict[str, Any]]:
    return [r for g in load_yaml(ALERTS_YML)["groups"] for r in g["rules"]]


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool is not installed (Debian/Ubuntu: apt-get install prometheus)")
    return path


# ----------------------------------------------------------------------------- parsing


@pytest.mark.parametrize("path", yaml_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_yaml_parses(path: Path) -> None:
    docs = list(yaml.safe_load_all(path.read_text()))
    assert docs and all(isinstance(d, dict) for d in docs), f"{path}: expected one or more mappings"


def test_every_expected_file_exists() -> None:
    for path in (DASHBOARD, DATASOURCES, DASHBOARD_PROVIDERS, PROMETHEUS_YML, ALERTS_YML, COMPOSE, DOCKERFILE,
                 SYSTEMD_UNIT, DEPLOY / "README.md"):
        assert path.is_file(), path
    kinds = {d["kind"] for d in k8s_docs()}
    assert {"Deployment", "Service"} <= kinds and kinds & {"ConfigMap", "Secret"}
    assert "Namespace" not in kinds
    assert all("namespace" not in d["metadata"] for d in k8s_docs() if "metadata" in d)


def test_dashboard_is_provisionable() -> None:
    dash = dashboard()
    assert dash["uid"] == "bgtransfer" and 36 <= dash["schemaVersion"] <= 39
    assert "${DS_" not in DASHBOARD.read_text() and "__inputs" not in dash
    (source,) = load_yaml(DATASOURCES)["datasources"]
    assert source["type"] == "prometheus" and source["uid"] == "prometheus"
    wanted = {"type": "prometheus", "uid": source["uid"]}
    cells: list[tuple[int, int, int, int]] = []
    for panel in dash["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24, panel["title"]
        for x, y, w, h in cells:  # no two panels on the same cells
            overlap = pos["x"] < x + w and x < pos["x"] + pos["w"] and pos["y"] < y + h and y < pos["y"] + pos["h"]
            assert not overlap, f"panel {panel['title']!r} overlaps another"
        cells.append((pos["x"], pos["y"], pos["w"], pos["h"]))
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == wanted, panel["title"]
        assert panel["targets"], panel["title"]
        for t in panel["targets"]:
            assert t["datasource"] == wanted and t["expr"].strip(), panel["title"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert set(variables) == {"device", "app"}
    for v in variables.values():
        assert v["datasource"] == wanted and v["query"]["query"].startswith("label_values(")
        assert v["query"]["query"].rstrip(")").endswith(f", {v['name']}")


def test_dashboard_is_where_grafana_looks_for_it() -> None:
    (provider,) = load_yaml(DASHBOARD_PROVIDERS)["providers"]
    grafana = load_yaml(COMPOSE)["services"]["grafana"]
    mounts = {src: dst.removesuffix(":ro") for src, dst in (v.split(":", 1) for v in grafana["volumes"])}
    assert mounts["../grafana/dashboards"] == provider["options"]["path"]
    assert mounts["../grafana/provisioning"] == "/etc/grafana/provisioning"
    (source,) = load_yaml(DATASOURCES)["datasources"]
    assert source["url"] == "http://prometheus:9090" and "prometheus" in load_yaml(COMPOSE)["services"]


# ----------------------------------------------------------------------------- promtool


def test_promtool_accepts_the_alert_rules() -> None:
    run = subprocess.run([promtool(), "check", "rules", str(ALERTS_YML)], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr


def test_promtool_accepts_the_prometheus_config() -> None:
    config = load_yaml(PROMETHEUS_YML)
    # promtool, like Prometheus, resolves rule_files relative to the configuration file
    assert [PROMETHEUS_YML.parent / f for f in config["rule_files"]] == [ALERTS_YML]
    assert [j["job_name"] for j in config["scrape_configs"]].count("bgtransfer") == 1
    run = subprocess.run([promtool(), "check", "config", str(PROMETHEUS_YML)], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr


def _series(name: str, values: str, **labels: str) -> dict[str, str]:
    inner = ", ".join(f'{k}="{v}"' for k, v in {"job": "bgtransfer", **labels}.items())
    return {"series": f"{name}{{{inner}}}", "values": values}


def _both_workers(name: str, values: str, **labels: str) -> list[dict[str, str]]:
    """A device-wide series, reported alike by two workers of the device."""
    return [_series(name, values, instance=w, **labels) for w in ("w1:9808", "w2:9808")]


def _expect(alert: str, at: str, *label_sets: dict[str, str]) -> dict[str, Any]:
    return {"eval_time": at, "alertname": alert, "exp_alerts": [{"exp_labels": dict(ls)} for ls in label_sets]}


def test_alert_rules_fire_when_and_only_when_documented(tmp_path: Path) -> None:
    """promtool's rule unit tests on synthetic series (annotations aside: check rules covers their templates)."""
    tool = promtool()
    rules = load_yaml(ALERTS_YML)
    for group in rules["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    (tmp_path / "alerts.yml").write_text(json.dumps(rules))
    active, cap = "bgtransfer_device_active_transfers", "bgtransfer_device_max_concurrent_transfers"
    moved, done = "bgtransfer_transfer_bytes_total", "bgtransfer_completions_total"
    dl = {"app": "a", "direction": "download"}
    warning, info, critical = {"severity": "warning"}, {"severity": "info"}, {"severity": "critical"}
    tests = [
        {  # slots held and no bytes: stuck after 10 minutes; at cap after 30; each alert once per device
            "interval": "1m",
            "input_series": [
                *_both_workers(active, "2x45", device="stuck"), *_both_workers(cap, "2x45", device="stuck"),
                _series(moved, "1000x45", instance="w1:9808", device="stuck", **dl),
                _series(moved, "0x45", instance="w2:9808", device="stuck", **dl),
                *_both_workers(active, "1x45", device="fresh"), *_both_workers(cap, "2x45", device="fresh"),
                *_both_workers(active, "1x45", device="busy"), *_both_workers(cap, "4x45", device="busy"),
                _series(moved, "0+100000x45", instance="w1:9808", device="busy", **dl),
                *_both_workers(active, "0x45", device="idle"), *_both_workers(cap, "2x45", device="idle"),
            ],
            "alert_rule_test": [
                _expect("BgtransferTransfersStuck", "9m"),
                _expect("BgtransferTransfersStuck", "11m", {"device": "fresh", **warning},
                        {"device": "stuck", **warning}),
                _expect("BgtransferDeviceAtCap", "29m"),
                _expect("BgtransferDeviceAtCap", "31m", {"device": "stuck", **info}),
            ],
        },
        {  # failures: half of 60 ended requests; one failure of one; cancellations are not failures
            "interval": "1m",
            "input_series": [
                _series(done, "0+1x60", instance="w1:9808", device="bad", outcome="completed", **dl),
                _series(done, "0+1x60", instance="w1:9808", device="bad", outcome="failed", **dl),
                _series(done, "0 1x59", instance="w1:9808", device="few", outcome="failed", **dl),
                _series(done, "0+1x60", instance="w1:9808", device="cancels", outcome="completed", **dl),
                _series(done, "0+3x60", instance="w1:9808", device="cancels", outcome="cancelled", **dl),
            ],
            "alert_rule_test": [
                _expect("BgtransferHighFailureRatio", "10m"),
                _expect("BgtransferHighFailureRatio", "40m", {"device": "bad", **warning}),
            ],
        },
        {  # waiting queue: +2 a minute from 10, reported by two workers (not added up); a flat one
            "interval": "1m",
            "input_series": [
                *_both_workers("bgtransfer_requests", "10+2x60", device="grow", app="a", status="WAITING"),
                *_both_workers("bgtransfer_requests", "80x60", device="flat", app="a", status="WAITING"),
                *_both_workers("bgtransfer_requests", "0+3x60", device="wifi", app="b", status="WAITING_FOR_WIFI"),
                *_both_workers("bgtransfer_requests", "0+3x60", device="done", app="b", status="COMPLETED"),
            ],
            "alert_rule_test": [
                # more than 50 from minute 21 on (from 11 if the two workers were summed)
                _expect("BgtransferWaitingQueueGrowing", "25m"),
                _expect("BgtransferWaitingQueueGrowing", "45m", {"device": "grow", **warning},
                        {"device": "wifi", **warning}),
            ],
        },
        {  # lease reclaims: 2 a minute from minute 10 on one device, none on another
            "interval": "1m",
            "input_series": [
                *_both_workers("bgtransfer_lease_reclaims_total", "0x9 2+2x20", device="flaky"),
                *_both_workers("bgtransfer_lease_reclaims_total", "0x30", device="calm"),
            ],
            "alert_rule_test": [
                _expect("BgtransferLeaseReclaimsSpiking", "10m"),
                _expect("BgtransferLeaseReclaimsSpiking", "25m", {"device": "flaky", **warning}),
            ],
        },
        {  # the store stopped answering both workers of one device; the other device is fine
            "interval": "1m",
            "input_series": [
                *_both_workers("bgtransfer_store_up", "1 1 0x10", device="lost"),
                *_both_workers("bgtransfer_store_up", "1x12", device="fine"),
            ],
            "alert_rule_test": [
                _expect("BgtransferStateStoreDown", "3m"),
                _expect("BgtransferStateStoreDown", "5m", {"device": "lost", **critical}),
            ],
        },
        {  # the only worker stopped answering
            "interval": "1m",
            "input_series": [_series("up", "0x20", instance="w1:9808")],
            "alert_rule_test": [
                _expect("BgtransferNoWorkerUp", "4m"),
                _expect("BgtransferNoWorkerUp", "6m", critical),
                _expect("BgtransferWorkerDown", "6m", {"job": "bgtransfer", "instance": "w1:9808", **warning}),
            ],
        },
        {  # no worker was ever discovered
            "interval": "1m",
            "input_series": [{"series": 'up{job="prometheus", instance="localhost:9090"}', "values": "1x20"}],
            "alert_rule_test": [_expect("BgtransferNoWorkerUp", "6m", {"job": "bgtransfer", **critical})],
        },
        {  # one worker of two up: no alert but the one for the worker down
            "interval": "1m",
            "input_series": [_series("up", "1x20", instance="w1:9808"), _series("up", "0x20", instance="w2:9808")],
            "alert_rule_test": [
                _expect("BgtransferNoWorkerUp", "10m"),
                _expect("BgtransferWorkerDown", "10m", {"job": "bgtransfer", "instance": "w2:9808", **warning}),
            ],
        },
    ]
    spec = tmp_path / "alerts_test.yml"
    spec.write_text(json.dumps({"rule_files": ["alerts.yml"], "evaluation_interval": "1m", "tests": tests}))
    run = subprocess.run([tool, "test", "rules", str(spec)], capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    tested = {t["alertname"] for group in tests for t in group["alert_rule_test"]}
    assert tested == {r["alert"] for r in alert_rules()}, "every alert rule needs a unit test"


def test_every_alert_is_documented() -> None:
    rules = load_yaml(ALERTS_YML)
    assert [g["name"] for g in rules["groups"]] == ["bgtransfer"]
    for rule in alert_rules():
        assert rule["alert"].startswith("Bgtransfer") and rule.get("for"), rule["alert"]
        assert rule["labels"]["severity"] in ("info", "warning", "critical"), rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]


# ----------------------------------------------------------------------------- environment


def test_every_bgtransfer_variable_in_deploy_is_a_real_setting() -> None:
    known = setting_names()
    seen: dict[str, set[str]] = {}
    for path in sorted(p for p in DEPLOY.rglob("*") if p.is_file()):
        for name in ENV_NAME.findall(path.read_text()):
            seen.setdefault(name, set()).add(str(path.relative_to(ROOT)))
    unknown = {name: sorted(where) for name, where in seen.items() if name not in known}
    assert not unknown, f"not bgtransfer settings: {unknown}"
    assert {"BGTRANSFER_BROKER_URL", "BGTRANSFER_DATABASE_URL", "BGTRANSFER_DEVICE"} <= set(seen)


def _compose_env() -> dict[str, str]:
    env = load_yaml(COMPOSE)["services"]["worker"]["environment"]
    # ${NAME:-default} as compose interpolates it with NAME unset
    return {k: re.sub(r"\$\{[A-Z0-9_]+:-([^}]*)\}", r"\1", str(v)) for k, v in env.items()}


def _k8s_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for doc in k8s_docs():
        if doc["kind"] in ("ConfigMap", "Secret"):
            env.update(doc.get("data", {}), **doc.get("stringData", {}))
    return env


def _dockerfile_env() -> dict[str, str]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    env: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("ENV "):
            env.update(part.split("=", 1) for part in shlex.split(line[4:]))
    return env


def _systemd_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for line in SYSTEMD_UNIT.read_text().replace("%i", "edge-1").splitlines():
        if line.startswith("Environment="):
            env.update(part.split("=", 1) for part in shlex.split(line.split("=", 1)[1]))
    return env


@pytest.mark.parametrize("source", [_compose_env, _k8s_env, _dockerfile_env, _systemd_env],
                         ids=["compose", "k8s", "dockerfile", "systemd"])
def test_every_value_set_is_valid_for_its_setting(source: Any) -> None:
    env = {k: v for k, v in source().items() if k.startswith("BGTRANSFER_")}
    assert env, f"{source.__name__}: no BGTRANSFER_* variable found"
    settings = load({k: str(v) for k, v in env.items()})  # raises on a value of the wrong type
    if "BGTRANSFER_METRICS_PORT" in env:
        assert settings.metrics_port == METRICS_PORT
    if "BGTRANSFER_METRICS_ADDR" in env:
        assert env["BGTRANSFER_METRICS_ADDR"] == "0.0.0.0"  # reachable from Prometheus in another container


# ----------------------------------------------------------------------------- commands


def _dockerfile_exec(instruction: str) -> list[str]:
    (line,) = [x for x in DOCKERFILE.read_text().splitlines() if x.startswith(instruction + " ")]
    return json.loads(line[len(instruction) + 1:])  # exec form only: no shell between


def worker_commands() -> dict[str, list[str]]:
    """The argv of every bgtransfer process the deployment files start."""
    entrypoint, cmd = _dockerfile_exec("ENTRYPOINT"), _dockerfile_exec("CMD")
    found = {"Dockerfile": entrypoint + cmd}
    for name, svc in load_yaml(COMPOSE)["services"].items():
        build = svc.get("build")
        ours = (isinstance(build, dict) and build.get("dockerfile") == "deploy/Dockerfile") or str(
            svc.get("image", "")).startswith("bgtransfer")
        if ours:
            command = svc.get("command", cmd)
            found[f"compose:{name}"] = svc.get("entrypoint", entrypoint) + (
                shlex.split(command) if isinstance(command, str) else command)
    for doc in k8s_docs():
        if doc["kind"] not in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
            continue
        for c in doc["spec"]["template"]["spec"]["containers"]:
            if c["image"].startswith("bgtransfer"):
                # Kubernetes: command replaces ENTRYPOINT (and drops CMD), args replace CMD
                found[f"k8s:{doc['metadata']['name']}/{c['name']}"] = (
                    c["command"] + c.get("args", []) if "command" in c else entrypoint + c.get("args", cmd))
    for line in SYSTEMD_UNIT.read_text().splitlines():
        if line.startswith("ExecStart="):
            found["systemd"] = shlex.split(line.split("=", 1)[1].lstrip("-@:+!").replace("%i", "edge-1"))
    return found


def test_commands_are_found_in_every_deployment() -> None:
    assert {k.split(":")[0] for k in worker_commands()} == {"Dockerfile", "compose", "k8s", "systemd"}


@pytest.mark.parametrize("where", sorted(worker_commands()))
def test_every_command_is_a_real_bgtransfer_invocation(where: str) -> None:
    argv = worker_commands()[where]
    assert Path(argv[0]).name == "bgtransfer", argv
    assert len(argv) > 1 and argv[1] in main.commands, f"{where}: no such subcommand in {argv}"
    command = main.commands[argv[1]]
    try:
        ctx = command.make_context(argv[1], list(argv[2:]))
    except click.UsageError as exc:
        pytest.fail(f"{where}: {shlex.join(argv)}: {exc}")
    assert argv[1] in ("worker", "serve"), f"{where} runs {argv[1]}, not a worker"
    if ctx.params.get("metrics_port") is not None:
        assert ctx.params["metrics_port"] == METRICS_PORT


def test_prometheus_scrapes_the_port_the_workers_serve() -> None:
    job = next(j for j in load_yaml(PROMETHEUS_YML)["scrape_configs"] if j["job_name"] == "bgtransfer")
    services = load_yaml(COMPOSE)["services"]
    for sd in job["dns_sd_configs"]:
        assert sd["port"] == METRICS_PORT and all(n in services for n in sd["names"])
    assert "--metrics-port" in worker_commands()["compose:worker"]
    assert f"EXPOSE {METRICS_PORT}" in DOCKERFILE.read_text()
    deployment = next(d for d in k8s_docs() if d["kind"] == "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert {"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"} in container["ports"]
    service = next(d for d in k8s_docs() if d["kind"] == "Service")
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    assert {p["targetPort"] for p in service["spec"]["ports"]} == {"metrics"}
    refs = {(ref.get("configMapRef") or ref.get("secretRef"))["name"] for ref in container["envFrom"]}
    assert refs <= {d["metadata"]["name"] for d in k8s_docs() if d["kind"] in ("ConfigMap", "Secret")}


# ----------------------------------------------------------------------------- metric names


def _expressions() -> dict[str, str]:
    exprs = {f"dashboard: {e}": e for e in dashboard_exprs()}
    exprs.update({f"variable {k}: {q}": q for k, q in variable_queries().items()})
    exprs.update({f"alert {r['alert']}": r["expr"] for r in alert_rules()})
    return exprs


def test_every_metric_used_is_exported() -> None:
    for where, expr in _expressions().items():
        unknown = set(METRIC_NAME.findall(expr)) - set(METRIC_LABELS)
        assert not unknown, f"{where}: unknown metrics {sorted(unknown)}"
        for name, labels in re.findall(r"\b(bgtransfer_[a-z_]+)\{([^}]*)\}", expr):
            used = set(re.findall(r"([a-z_]+)\s*(?:=~|!~|!=|=)", labels)) - {"job"}
            assert used <= METRIC_LABELS[name], f"{where}: {name} has no label(s) {sorted(used - METRIC_LABELS[name])}"
        for clause in re.findall(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)", expr):
            for label in filter(None, (x.strip() for x in clause.split(","))):
                names = METRIC_NAME.findall(expr)
                assert label == "le" or any(label in METRIC_LABELS[n] for n in names), f"{where}: by {label}"


def test_the_dashboard_shows_every_metric() -> None:
    used = {n for e in dashboard_exprs() for n in METRIC_NAME.findall(e)}
    assert used == set(METRIC_LABELS), f"not on the dashboard: {sorted(set(METRIC_LABELS) - used)}"


def test_device_wide_series_are_never_summed_across_workers() -> None:
    """Every worker of a device reports the store's series alike: each use sits right inside a
    max by (device, ...), possibly through a rate or increase, before any other aggregation."""
    inside_max = re.compile(r"max by \(device\b[^)]*\)\s*\(\s*(?:(?:rate|increase)\(\s*)?$")
    for where, expr in _expressions().items():
        if where.startswith("variable"):
            continue
        for name in set(METRIC_NAME.findall(expr)) & set(STORE_METRICS):
            for m in re.finditer(rf"\b{name}\b", expr):
                assert inside_max.search(expr[: m.start()]), f"{where}: {name} must be taken as max by (device)"


def test_panels_follow_the_template_variables() -> None:
    for expr in dashboard_exprs():
        for name, labels in re.findall(r"\b(bgtransfer_[a-z_]+)\{([^}]*)\}", expr):
            assert 'device=~"$device"' in labels, f"{expr}: {name} is not filtered by $device"
            if "app" in METRIC_LABELS.get(name, set()):
                assert 'app=~"$app"' in labels, f"{expr}: {name} is not filtered by $app"
    assert 'device=~"$device"' in variable_queries()["app"]


def test_the_metric_list_is_what_the_code_exports() -> None:
    from prometheus_client import Counter, Histogram

    from bgtransfer import _metrics

    exported = {}
    for obj in vars(_metrics).values():
        if isinstance(obj, (Counter, Histogram)):
            (desc,) = obj.describe()
            exported[desc.name + ("_total" if desc.type == "counter" else "")] = set(obj._labelnames)
    assert exported == WORKER_METRICS
    source = Path(_metrics.__file__).read_text()  # the store's families are built at scrape time
    counters = set(re.findall(r'CounterMetricFamily\(\s*"(bgtransfer_[a-z_]+)"', source))
    gauges = set(re.findall(r'(?:GaugeMetricFamily|_gauge)\(\s*"(bgtransfer_[a-z_]+)"', source))
    assert {f"{name}_total" for name in counters} | gauges == set(STORE_METRICS)
