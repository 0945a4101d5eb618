"""Memory settings of the embedded Postgres: explicit values win, the rest are sized from the memory
the machine gives the appliance, and the test environment keeps Postgres's defaults."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from appliance.runtime.postgres import available_memory_bytes, memory_settings
from appliance.settings import Settings

GiB = 2**30


def test_sized_from_the_machines_memory() -> None:
    s = Settings(environment="production")
    assert memory_settings(s, memory_bytes=24 * GiB) == {
        "shared_buffers": "6144MB",
        "effective_cache_size": "12288MB",
        "maintenance_work_mem": "1536MB",
        "work_mem": "16MB",
    }


def test_bounds_on_small_and_large_machines() -> None:
    s = Settings(environment="production")
    small = memory_settings(s, memory_bytes=GiB // 4)
    assert small["shared_buffers"] == "128MB"  # never below Postgres's own default
    assert small["effective_cache_size"] == "512MB"
    assert small["maintenance_work_mem"] == "64MB"
    large = memory_settings(s, memory_bytes=512 * GiB)
    assert large["shared_buffers"] == "16384MB"
    assert large["maintenance_work_mem"] == "2048MB"
    assert large["effective_cache_size"] == "262144MB"


def test_explicit_values_win_and_the_test_environment_sets_only_those() -> None:
    s = Settings(environment="production", pg_shared_buffers="2GB", pg_work_mem="64MB")
    got = memory_settings(s, memory_bytes=24 * GiB)
    assert got["shared_buffers"] == "2GB" and got["work_mem"] == "64MB"
    assert got["effective_cache_size"] == "12288MB"
    assert memory_settings(Settings(environment="test"), memory_bytes=24 * GiB) == {}
    assert memory_settings(Settings(environment="test", pg_shared_buffers="48MB")) == {
        "shared_buffers": "48MB"
    }


@pytest.mark.parametrize("value", ["2 GB", "2G", "0MB", "lots", "-1MB", "2GB'; DROP"])
def test_a_malformed_size_is_refused(value: str) -> None:
    with pytest.raises(ValidationError, match="Postgres memory size"):
        Settings(environment="test", pg_shared_buffers=value)


def test_available_memory_is_positive_and_at_most_the_ram() -> None:
    import psutil

    assert 0 < available_memory_bytes() <= psutil.virtual_memory().total
