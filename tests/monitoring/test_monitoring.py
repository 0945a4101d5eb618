"""monitoring/: the alert rules and the Grafana dashboard use only metrics the appliance exports
(appliance/metrics.py) or that are named as external (Prometheus' `up`, node_exporter's), and the rules
pass `promtool check rules` where promtool is installed (Debian package `prometheus`)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase

from appliance import metrics

MONITORING = Path(__file__).resolve().parents[2] / "monitoring"
RULES = MONITORING / "prometheus-rules.yml"
DASHBOARD = MONITORING / "grafana" / "appliance-dashboard.json"
EXTERNAL = {"up", "node_systemd_unit_state", "node_filesystem_avail_bytes", "node_filesystem_size_bytes"}
# Metric names in PromQL: label names and functions never start with these prefixes; `up` is matched
# only as a selector (`up{`).
NAME = re.compile(r"\b((?:appliance|node)_[a-z0-9_]+)\b|\b(up)\{")


def exported_names() -> set[str]:
    """Every sample name the appliance's collectors expose (histograms: _bucket/_sum/_count)."""
    names: set[str] = set()
    for value in vars(metrics).values():
        if not isinstance(value, MetricWrapperBase):
            continue
        for family in value.describe():
            base = family.name
            if family.type == "counter":
                names.update({f"{base}_total", f"{base}_created"})
            elif family.type == "histogram":
                names.update({f"{base}_bucket", f"{base}_sum", f"{base}_count", f"{base}_created"})
            else:
                names.add(base)
    # The queue-depth gauge is collected at scrape time from Redis.
    names.add("appliance_queue_depth")
    return names


def rule_exprs() -> list[str]:
    doc = yaml.safe_load(RULES.read_text())
    return [rule["expr"] for group in doc["groups"] for rule in group["rules"]]


def dashboard_exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"] for v in dash["templating"]["list"] if "definition" in v]
    return exprs


def used_names(exprs: list[str]) -> set[str]:
    return {m.group(1) or m.group(2) for e in exprs for m in NAME.finditer(e)}


def test_rules_use_real_metrics() -> None:
    exported = exported_names()
    used = used_names(rule_exprs())
    assert used & exported, "no appliance metric found in the rules"
    assert used - exported - EXTERNAL == set()


def test_dashboard_uses_real_metrics() -> None:
    exported = exported_names()
    used = used_names(dashboard_exprs())
    assert len(used & exported) >= 8
    assert used - exported - EXTERNAL == set()


def test_dashboard_shape() -> None:
    dash = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)) and dash["uid"] and dash["title"]
    assert all(p["targets"] and p["datasource"]["uid"] == "${DS_PROMETHEUS}" for p in dash["panels"])


def test_every_appliance_metric_is_on_the_dashboard() -> None:
    used = used_names(dashboard_exprs())
    families = {n.removesuffix("_bucket").removesuffix("_count").removesuffix("_sum") for n in used}
    wanted = {
        "appliance_http_requests_total",
        "appliance_http_request_duration_seconds",
        "appliance_ingest_stage_seconds",
        "appliance_ingest_failures_total",
        "appliance_embedding_tokens_total",
        "appliance_llm_tokens_total",
        "appliance_llm_generation_seconds",
        "appliance_llm_rejected_total",
        "appliance_search_cache_total",
        "appliance_auth_failures_total",
        "appliance_queue_depth",
        "appliance_rate_limited_total",
        "appliance_rate_limit_storage_errors_total",
    }
    assert wanted - families == set()


@pytest.mark.skipif(shutil.which("promtool") is None, reason="no promtool (Debian package prometheus)")
def test_promtool_check_rules() -> None:
    proc = subprocess.run(["promtool", "check", "rules", str(RULES)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout
