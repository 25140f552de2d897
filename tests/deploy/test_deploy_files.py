"""Deployment files checked with the real tools: hadolint, promtool, kubernetes-validate, Prometheus."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
DASHBOARD = DOCKER / "grafana" / "dashboards" / "infinity-serve.json"
RULES = DOCKER / "prometheus" / "alerts.yml"


def tool(name: str) -> str:
    """A command-line tool, looked up beside the interpreter first. CI must have it; elsewhere skip."""
    path = shutil.which(name, path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is not installed (.ci/run installs it)")
        pytest.skip(f"{name} not installed (CI installs it)")
    return path


def run(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def dashboard_expressions() -> list[str]:
    return [t["expr"] for p in json.loads(DASHBOARD.read_text())["panels"] for t in p["targets"]]


ALL_MODELS = ".*"  # what Grafana puts for `$model` when "All" is chosen (the variable's allValue)


def rule_expressions() -> list[str]:
    return [r["expr"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]


def test_dockerfile_passes_hadolint():
    r = run(tool("hadolint"), "--config", str(ROOT / ".hadolint.yaml"), str(ROOT / "Dockerfile"))
    assert r.returncode == 0, r.stdout + r.stderr


def test_dockerfile_basics():
    text = (ROOT / "Dockerfile").read_text()
    for needed in ("HEALTHCHECK", "/healthz", "USER 10001", "STOPSIGNAL SIGTERM", 'VOLUME ["/weights"]', "ARG VARIANT"):
        assert needed in text, needed
    ignored = (ROOT / ".dockerignore").read_text().split()
    for kept_out in ("tests", ".venv", "**/__pycache__", ".env", ".git", "runs"):
        assert kept_out in ignored, kept_out


def test_prometheus_config_and_rules_pass_promtool():
    promtool = tool("promtool")
    r = run(promtool, "check", "config", str(DOCKER / "prometheus" / "prometheus.yml"))
    assert r.returncode == 0, r.stdout + r.stderr
    r = run(promtool, "check", "rules", str(RULES))
    assert r.returncode == 0 and f"{len(rule_expressions())} rules found" in r.stdout, r.stdout + r.stderr


def test_kubernetes_manifests_validate_against_the_schemas():
    manifests = sorted(str(p) for p in (DOCKER / "k8s").glob("*.yaml"))
    assert len(manifests) >= 4
    r = run(tool("kubernetes-validate"), "--strict", *manifests)
    assert r.returncode == 0, r.stdout + r.stderr
    kinds = {yaml.safe_load(Path(m).read_text())["kind"] for m in manifests}
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"} <= kinds


def test_the_deployment_cannot_start_without_its_api_keys():
    deployment = yaml.safe_load((DOCKER / "k8s" / "deployment.yaml").read_text())
    env = {e["name"]: e for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    secret = env["INFINITY_API_KEYS"]["valueFrom"]["secretKeyRef"]
    assert secret.get("optional", False) is False, "an optional secret lets the pod serve without keys"
    assert "INFINITY_ALLOW_UNAUTHENTICATED" not in env


def test_images_and_stacks_are_never_open_by_default():
    lines = (ROOT / "Dockerfile").read_text().splitlines()
    instructions = [line for line in lines if not line.lstrip().startswith("#")]
    assert not any("ALLOW_UNAUTHENTICATED" in line for line in instructions)  # the operator says so, not the image
    server = yaml.safe_load((DOCKER / "compose.yaml").read_text())["services"]["server"]
    if server["environment"].get("INFINITY_ALLOW_UNAUTHENTICATED") == "true":  # key-less: this machine only
        assert all(str(port).startswith("127.0.0.1:") for port in server["ports"]), server["ports"]


def test_compose_file_parses_and_references_existing_files():
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    assert set(compose["services"]) == {"server", "prometheus", "grafana"}
    build = compose["services"]["server"]["build"]
    assert (DOCKER / build["context"] / build["dockerfile"]).is_file()
    gpu = compose["services"]["server"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["capabilities"] == ["gpu"]
    for service in compose["services"].values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (DOCKER / source).exists(), source


def test_the_dashboard_picks_models_and_every_per_model_query_follows_the_pick():
    from server.metrics import Metrics
    from tests.server.test_metrics import _every_series

    (variable,) = json.loads(DASHBOARD.read_text())["templating"]["list"]
    assert variable["name"] == "model" and variable["definition"] == "label_values(infinity_ready, model)"
    assert variable["multi"] and variable["includeAll"] and variable["allValue"] == ALL_MODELS
    per_model = {s.name for f in _every_series(Metrics(), "a") for s in f.samples if "model" in s.labels}
    assert "infinity_queue_depth" in per_model and "infinity_batch_size_images_bucket" in per_model
    for expr in dashboard_expressions():
        for name in set(re.findall(r"\binfinity_[a-z_]+", expr)) & per_model:
            uses = re.findall(rf"\b{name}\b(\{{[^}}]*\}})?", expr)
            assert all('model=~"$model"' in selector for selector in uses), (name, expr)


def test_every_metric_the_dashboard_and_rules_use_exists(pipeline):
    from fastapi.testclient import TestClient

    from tests.server.conftest import make_app

    app, engine = make_app(pipeline)
    try:
        client = TestClient(app)
        assert client.post("/generate", json={"prompt": "a"}).status_code == 200  # labelled series appear
        exposed = client.get("/metrics").text
    finally:
        engine.drain(5)
    used = set()
    for expr in dashboard_expressions() + rule_expressions():
        used |= set(re.findall(r"\binfinity_[a-z_]+", expr))
    assert used
    for name in used:
        assert re.search(rf"^(# TYPE )?{name}\b", exposed, re.M), name


EXPECT_DATA = (
    "infinity_requests_total",
    "request_duration_seconds_bucket",
    "infinity_queue_depth",
    "images_generated",
    "stage_duration",
    "scale_step",
    "batch_size_images",
    "device_memory",
    "infinity_ready",
    "queue_wait",
)


def test_real_prometheus_scrapes_the_server_and_every_expression_evaluates(pipeline, tmp_path):
    from tests.server.conftest import free_port, make_app, running_server

    prometheus = tool("prometheus")
    app, engine = make_app(pipeline)
    with running_server(app) as url:
        target = url.removeprefix("http://")
        config = tmp_path / "prometheus.yml"
        config.write_text(
            yaml.safe_dump(
                {
                    "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                    "scrape_configs": [{"job_name": "infinity-serve", "static_configs": [{"targets": [target]}]}],
                }
            )
        )
        port = free_port()
        proc = subprocess.Popen(
            [
                prometheus,
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        api = f"http://127.0.0.1:{port}/api/v1"
        try:

            def query(expr: str) -> dict:
                r = httpx.get(f"{api}/query", params={"query": expr}, timeout=10).json()
                assert r["status"] == "success", (expr, r)
                return r["data"]

            deadline = time.monotonic() + 60
            while True:  # Prometheus up and scraping
                try:
                    if query('up{job="infinity-serve"}')["result"]:
                        break
                except (httpx.TransportError, AssertionError, ValueError):
                    pass
                assert time.monotonic() < deadline, "Prometheus never scraped the server"
                time.sleep(0.5)
            for i in range(4):
                assert (
                    httpx.post(f"{url}/generate", json={"prompt": "a red circle", "seed": i}, timeout=60).status_code
                    == 200
                )
            assert httpx.post(f"{url}/generate", json={"prompt": "a", "n": 0}).status_code == 400
            time.sleep(3)  # a few scrapes after the traffic
            for expr in dashboard_expressions():
                data = query(expr.replace("$model", ALL_MODELS))
                if any(marker in expr for marker in EXPECT_DATA) and "reason" not in expr:
                    assert data["result"], f"no data for {expr}"
            for expr in rule_expressions():  # alerts: evaluate; quiet is the right answer
                assert query(expr)["result"] == [], expr
        finally:
            proc.terminate()
            proc.wait(10)
            engine.drain(5)


def test_the_whole_shutdown_fits_in_the_grace_period():
    """preStop sleep + the one drain deadline + a margin to exit must end before Kubernetes kills the pod."""
    spec = yaml.safe_load((DOCKER / "k8s" / "deployment.yaml").read_text())["spec"]["template"]["spec"]
    server = spec["containers"][0]
    command = server["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    env = {e["name"]: e.get("value") for e in server["env"]}
    drain = float(env["INFINITY_DRAIN_TIMEOUT_S"])
    assert float(command[1]) + drain + 10 <= spec["terminationGracePeriodSeconds"]
