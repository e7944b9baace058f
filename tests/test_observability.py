"""docker-compose, Prometheus and Grafana files: valid, consistent, and every dashboard query
returns data from a real Prometheus (Debian's `prometheus`) scraping the real QAdA server."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import time

import httpx
import pytest
import yaml

from serving.testing import REPO, SERVED_NAME, Prometheus

DOCKER = REPO / "docker"


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is missing: .ci/run installs it")
        pytest.skip(f"{name} is not installed (apt-get install prometheus docker-compose)")
    return path


def load_dashboard_module():
    spec = importlib.util.spec_from_file_location("dashboard", DOCKER / "grafana" / "dashboard.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_compose_file_is_consistent():
    compose = yaml.safe_load((DOCKER / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) == {"qada", "prometheus", "grafana"}
    for name, service in services.items():
        assert "healthcheck" in service, name
        for volume in service.get("volumes", []):
            assert (DOCKER / volume.split(":")[0]).exists(), volume
    build = services["qada"]["build"]
    assert (DOCKER / build["context"] / build["dockerfile"]).is_file()
    assert "/health" in " ".join(services["qada"]["healthcheck"]["test"])
    assert "8000:8000" in services["qada"]["ports"]
    prometheus = yaml.safe_load((DOCKER / "prometheus.yml").read_text())
    assert prometheus["scrape_configs"][0]["static_configs"][0]["targets"] == ["qada:8000"]
    datasource = yaml.safe_load((DOCKER / "grafana/provisioning/datasources/prometheus.yaml").read_text())
    assert datasource["datasources"][0]["uid"] == "prometheus"
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"
    provider = yaml.safe_load((DOCKER / "grafana/provisioning/dashboards/qada.yaml").read_text())
    mount = next(v for v in services["grafana"]["volumes"] if "dashboards:" in v)
    assert provider["providers"][0]["options"]["path"] == mount.split(":")[1]
    for dockerfile in ("Dockerfile.cpu", "Dockerfile.gpu"):
        config = (DOCKER / dockerfile).read_text().split('"--config", "')[1].split('"')[0]
        assert (REPO / config).is_file(), config


def test_compose_file_parses_with_docker_compose():
    result = subprocess.run(
        [tool("docker-compose"), "-f", str(DOCKER / "docker-compose.yml"), "config", "-q"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr


def test_prometheus_config_is_valid():
    result = subprocess.run(
        [tool("promtool"), "check", "config", str(DOCKER / "prometheus.yml")], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dashboard_file_is_what_the_generator_writes():
    module = load_dashboard_module()
    assert (DOCKER / "grafana/dashboards/qada.json").read_text() == module.render()
    board = json.loads(module.render())
    assert all(t["datasource"]["uid"] == "prometheus" for p in board["panels"] for t in p["targets"])


@pytest.fixture(scope="module")
def prometheus(qada_server, tmp_path_factory):
    """A real Prometheus on loopback scraping the QAdA test server every second."""
    server = Prometheus(
        tool("prometheus"), qada_server.url.removeprefix("http://"), tmp_path_factory.mktemp("prometheus")
    )
    yield server.url
    server.stop()


def test_every_dashboard_query_returns_data(prometheus, qada_server, qada_client):
    httpx.put(
        qada_server.url + "/v1/qada/policy",
        # page selection ranked by the key copy: blocks read and skipped, key-copy bytes read
        json={"policy": "qada", "page_top_k": 2, "page_rank_bits": 4},
        headers={"Authorization": "Bearer sk-qada-test"},
    ).raise_for_status()
    time.sleep(3)  # a first scrape before the traffic, so that rates see increases
    prompt = "A long letter about the weather in the mountains. " * 80  # 7 KV blocks (prefix-cached)
    for _ in range(6):
        qada_client.completions.create(
            model=SERVED_NAME, prompt=prompt, max_tokens=8, extra_body={"ignore_eos": True}
        )
    time.sleep(3)  # the last scrape after the traffic
    empty = []
    dashboard = load_dashboard_module()
    for expr in dashboard.queries(dashboard.dashboard()):
        query = expr.replace("$__rate_interval", "2m")
        reply = httpx.get(prometheus + "/api/v1/query", params={"query": query}).json()
        assert reply["status"] == "success", (query, reply)
        values = [float(r["value"][1]) for r in reply["data"]["result"]]
        if not values or all(v != v for v in values):  # no series, or only NaN
            empty.append(query)
    assert not empty, f"queries without data: {empty}"
