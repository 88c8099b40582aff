"""The worker template's autoscaling and monitoring files: KEDA, HPA, Grafana, Prometheus rules.

The manifests parse with the right kinds and point at the template's own Deployment
and at the stream and group a RedisStreamQueue really uses; the alerting rules pass
their ``promtool test rules`` cases; and every series the dashboard, the rules, their
tests and the HPA name is one a real host serves on ``/metrics``.
"""

from __future__ import annotations

import http.client
import json
import re
import shutil
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest
import yaml

from hostkit import BackgroundService, HostBuilder, HostOptions, RestartPolicy, ServiceState
from hostkit.cli import main
from tests.conftest import wait_until

PROJECT = "order-sync"
PROMTOOL_SKIP = "promtool is not installed (Debian: apt-get install prometheus; .ci/system-deps does it)"


def _generate(directory: Path) -> Path:
    project = directory / PROJECT
    assert main(["new", "worker", PROJECT, "--directory", str(project)]) == 0
    return project


def _promtool() -> str:
    tool = shutil.which("promtool") or ("/usr/bin/promtool" if Path("/usr/bin/promtool").exists() else None)
    if tool is None:
        pytest.skip(PROMTOOL_SKIP)
    return tool


def _deployment(project: Path) -> dict[str, Any]:
    (deployment,) = [d for d in yaml.safe_load_all((project / "deploy" / "kubernetes.yaml").read_text()) if d]
    assert deployment["kind"] == "Deployment"
    return deployment


def _dashboard_exprs(project: Path) -> list[str]:
    dashboard = json.loads((project / "deploy" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 8, exprs
    return exprs


def _series_names(text: str) -> set[str]:
    # A series name: hostkit_ and lowercase words; PromQL functions and label names never start so.
    return set(re.findall(r"\bhostkit_[a-z_]+[a-z]\b", text))


class TestManifests:
    def test_keda_scaledobject_scales_the_deployment_on_the_queues_stream_and_group(self, tmp_path: Path) -> None:
        """A keda.sh ScaledObject with a redis-streams trigger on the Deployment and hostkit's stream and group."""
        pytest.importorskip("redis")
        from hostkit.queues import RedisStreamQueue
        from hostkit.queues._redis import GROUP

        project = _generate(tmp_path)
        (scaled,) = [d for d in yaml.safe_load_all((project / "deploy" / "keda-scaledobject.yaml").read_text()) if d]
        assert (scaled["apiVersion"], scaled["kind"]) == ("keda.sh/v1alpha1", "ScaledObject")
        spec = scaled["spec"]
        assert spec["scaleTargetRef"]["name"] == _deployment(project)["metadata"]["name"]
        assert 1 <= spec["minReplicaCount"] < spec["maxReplicaCount"]
        (trigger,) = spec["triggers"]
        assert trigger["type"] == "redis-streams"
        meta = trigger["metadata"]
        assert meta["stream"] == RedisStreamQueue("redis://127.0.0.1:6379/0", "jobs").stream
        assert meta["consumerGroup"] == GROUP
        assert re.fullmatch(r"[\w.-]+:\d+", meta["address"]), meta["address"]
        # KEDA reads every value as a string; a bare number would be refused.
        assert isinstance(meta["lagCount"], str) and int(meta["lagCount"]) > 0
        text = (project / "deploy" / "keda-scaledobject.yaml").read_text()
        assert "pendingEntriesCount" in text and "streamLength" in text, "the comments compare the three signals"

    def test_hpa_scales_the_deployment_on_the_queue_depth_gauge(self, tmp_path: Path) -> None:
        """An autoscaling/v2 HPA on the external metric hostkit_queue_depth{queue=...}, with the adapter rule."""
        project = _generate(tmp_path)
        text = (project / "deploy" / "hpa.yaml").read_text()
        (hpa,) = [d for d in yaml.safe_load_all(text) if d]
        assert (hpa["apiVersion"], hpa["kind"]) == ("autoscaling/v2", "HorizontalPodAutoscaler")
        deployment = _deployment(project)
        target = hpa["spec"]["scaleTargetRef"]
        assert (target["apiVersion"], target["kind"], target["name"]) == (
            deployment["apiVersion"],
            "Deployment",
            deployment["metadata"]["name"],
        )
        (metric,) = hpa["spec"]["metrics"]
        assert metric["type"] == "External"
        assert metric["external"]["metric"]["name"] == "hostkit_queue_depth"
        assert set(metric["external"]["metric"]["selector"]["matchLabels"]) == {"queue"}
        assert metric["external"]["target"]["type"] == "AverageValue"
        # The adapter's rule, in the comments, takes the max over replicas (each reports the same queue).
        assert "max by (queue) (hostkit_queue_depth{<<.LabelMatchers>>})" in text

    def test_dashboard_is_grafana_json_over_a_datasource_variable(self, tmp_path: Path) -> None:
        """The dashboard parses, has a title with the project's name, and every panel queries the chosen Prometheus."""
        project = _generate(tmp_path)
        dashboard = json.loads((project / "deploy" / "grafana-dashboard.json").read_text())
        assert PROJECT in dashboard["title"]
        assert "{{" not in dashboard["title"] + dashboard["uid"]
        variables = {v["name"]: v for v in dashboard["templating"]["list"]}
        assert variables["datasource"]["type"] == "datasource"
        for panel in dashboard["panels"]:
            for t in panel.get("targets", []):
                assert t["datasource"]["uid"] == "${datasource}", panel["title"]


class TestPromtool:
    def test_alert_rules_pass_their_promtool_tests(self, tmp_path: Path) -> None:
        """`promtool check rules` and `promtool test rules` pass on the generated project's files."""
        tool = _promtool()
        deploy = _generate(tmp_path) / "deploy"
        checked = subprocess.run(
            [tool, "check", "rules", "prometheus-alerts.yaml"], cwd=deploy, capture_output=True, text=True, timeout=60
        )
        assert checked.returncode == 0, checked.stdout + checked.stderr
        tested = subprocess.run(
            [tool, "test", "rules", "prometheus-alerts.test.yaml"],
            cwd=deploy,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert tested.returncode == 0, tested.stdout + tested.stderr
        # Every alert has a test case that expects it to fire.
        rules = yaml.safe_load((deploy / "prometheus-alerts.yaml").read_text())
        alerts = {r["alert"] for g in rules["groups"] for r in g["rules"]}
        cases = yaml.safe_load((deploy / "prometheus-alerts.test.yaml").read_text())["tests"]
        fired = {a["alertname"] for c in cases for a in c["alert_rule_test"] if a["exp_alerts"]}
        assert alerts == fired, alerts ^ fired
        assert {
            "HostkitServiceFailed",
            "HostkitServiceRestartLoop",
            "HostkitHeartbeatMissed",
            "HostkitLivenessFailing",
            "HostkitQueueOldestMessageTooOld",
            "HostkitQueueDeadLettersRising",
        } <= alerts

    def test_dashboard_queries_are_valid_promql(self, tmp_path: Path) -> None:
        """Each panel's query, with the dashboard's variables filled in, passes promtool's PromQL parser."""
        tool = _promtool()
        exprs = _dashboard_exprs(_generate(tmp_path))
        rules = {
            "groups": [
                {
                    "name": "dashboard",
                    "rules": [
                        {"record": f"dashboard:query_{n}", "expr": e.replace("$job", ".*")} for n, e in enumerate(exprs)
                    ],
                }
            ]
        }
        path = tmp_path / "dashboard-rules.yaml"
        path.write_text(yaml.safe_dump(rules))
        checked = subprocess.run([tool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
        assert checked.returncode == 0, checked.stdout + checked.stderr


class Beating(BackgroundService):
    def execute(self, stopping: Any) -> None:
        while not stopping.wait(0.05):
            self.heartbeat()


class Flaky(BackgroundService):
    """Fails at once every run: the restart policy restarts it."""

    runs = 0

    def execute(self, stopping: Any) -> None:
        Flaky.runs += 1
        raise RuntimeError("boom")


def _scrape(port: int) -> str:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", "/metrics")
        response = conn.getresponse()
        assert response.status == 200
        return response.read().decode()
    finally:
        conn.close()


class TestSeries:
    @pytest.mark.timeout(60)
    def test_every_series_the_dashboard_rules_and_hpa_name_is_served_by_a_real_host(self, tmp_path: Path) -> None:
        """A host with a heartbeat, a restarting service and a queue consumer serves every series they use."""
        pytest.importorskip("prometheus_client")
        from prometheus_client.parser import text_string_to_metric_families

        from hostkit.health import use_health
        from hostkit.queues import QueueConsumer, SQLiteQueue

        project = _generate(tmp_path / "gen")
        deploy = project / "deploy"
        used = _series_names("\n".join(_dashboard_exprs(project)))
        rules_text = (deploy / "prometheus-alerts.yaml").read_text()
        rules = yaml.safe_load(rules_text)
        used |= _series_names("\n".join(r["expr"] for g in rules["groups"] for r in g["rules"]))
        cases = yaml.safe_load((deploy / "prometheus-alerts.test.yaml").read_text())["tests"]
        used |= _series_names("\n".join(s["series"] for c in cases for s in c["input_series"]))
        used |= _series_names((deploy / "hpa.yaml").read_text())
        assert len(used) >= 10, used

        queue = SQLiteQueue(tmp_path / "jobs.db", "jobs")
        queue.enqueue({"n": 1})
        handled = threading.Event()
        builder = HostBuilder(options=HostOptions(shutdown_timeout=10))
        use_health(builder, port=0)
        builder.services.add_hosted_service(Beating, heartbeat_timeout=30)
        builder.services.add_hosted_service(Flaky, restart=RestartPolicy(max_restarts=None, backoff=0.05, jitter=0))
        builder.services.add_hosted_service(
            QueueConsumer(queue, lambda m, s: handled.set(), poll_interval=0.05, name="jobs"), name="jobs"
        )
        host = builder.build()
        with queue, host:
            port = next(r.service for r in host.service_records() if r.name == "health").listener.port
            assert handled.wait(20)
            assert wait_until(lambda: host.status()["Flaky"].restarts >= 2, timeout=20)
            text = _scrape(port)
        served = {s.name for family in text_string_to_metric_families(text) for s in family.samples}
        assert not used - served, f"named but not served: {sorted(used - served)}; served: {sorted(served)}"
        # The label values the rules match on are ones the host really uses.
        states = {s.value for s in ServiceState}
        for pattern in re.findall(r'state=~"([^"]+)"', rules_text):
            assert set(pattern.split("|")) <= states, pattern
        assert 'hostkit_health_probe_ok{probe="live"} 1.0' in text
        assert re.search(r'hostkit_service_restarts_total\{service="Flaky"\} [1-9]', text), text
        assert re.search(r'hostkit_service_heartbeat_age_seconds\{service="Beating"\} 0\.\d+', text), text
        assert 'hostkit_service_heartbeat_timeout_seconds{service="Beating"} 30.0' in text
