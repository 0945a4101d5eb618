"""The embedded run mode: a private Postgres (pgvector) and Redis, the API and the workers, supervised.

`appliance up` uses `Supervisor`; the test suite starts just the datastores through the same code:

    ds = start_datastores(load_settings(home, environment="test", pg_port=..., redis_port=...))
    ...  # ds.settings holds the generated passwords
    ds.stop()
"""

from __future__ import annotations

from appliance.runtime.common import RuntimeFailure
from appliance.runtime.postgres import bootstrap_database
from appliance.runtime.supervisor import (
    Datastores,
    Supervisor,
    component_status,
    running_supervisor,
    start_datastores,
    stop_running,
)

__all__ = [
    "Datastores",
    "RuntimeFailure",
    "Supervisor",
    "bootstrap_database",
    "component_status",
    "running_supervisor",
    "start_datastores",
    "stop_running",
]
