"""Chaos, short form: one round of SIGKILLs (an API worker, a Dramatiq worker, Redis, Postgres) under a
steady stream of uploads and searches. Nothing acknowledged is lost, no chunk is duplicated, no job
is stuck, and the appliance recovers from each fault. The long form is `bench/chaos.py`."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.chaos import FAULTS, run_chaos, table
from tests.e2e.test_up import appliance_with_tenant, cli_env, home_settings

pytestmark = pytest.mark.slow


@pytest.fixture
def running() -> Iterator[tuple[Path, str, dict[str, str]]]:
    fast_sweeps = (
        "APPLIANCE_JOB_HEARTBEAT_STALE_S=5\nAPPLIANCE_SWEEP_INTERVAL_S=2\nAPPLIANCE_JOB_QUEUED_STALE_S=5\n"
    )
    with appliance_with_tenant("appliance-chaos-", "chaos", env_file=fast_sweeps) as (home, api, editor):
        yield home, api, {"Authorization": f"Bearer {editor}"}


def test_kill_each_component_under_load(running: tuple[Path, str, dict[str, str]]) -> None:
    home, api, headers = running
    result = run_chaos(
        home, api, headers, cli_env(home), home_settings(home).owner_database_url, rounds=1, settle_s=2.0
    )
    print("\n" + table(result))
    assert [f["fault"] for f in result["faults"]] == list(FAULTS)
    assert result["uploads_acknowledged"] > 0 and result["searches_ok"] > 0
    # While a component is down, requests fail cleanly: 503 with Retry-After, or a connection the
    # killed API worker dropped; never a 500.
    assert not [k for k in result["failures_by_kind"] if k.split()[-1] not in ("503",) and "Error" not in k]
    assert result["lost"] == 0
    assert result["not_ready"] == 0
    assert result["duplicated_chunks"] == 0
    assert result["stuck_jobs"] == 0
