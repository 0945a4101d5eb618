"""Chaos, long form: `rounds` rounds of SIGKILL (an API worker, a Dramatiq worker, Redis, Postgres)
under a steady stream of uploads and searches against a real `appliance up`; prints the recovery
time of each fault and what was lost, duplicated or stuck afterwards.

    .venv/bin/python bench/chaos.py [--rounds 5] [--settle 5]

The driver is tests/e2e/chaos.py (the CI test runs one round). Run as root after ./install.sh.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.e2e.chaos import run_chaos, table  # noqa: E402
from tests.e2e.test_up import appliance_with_tenant, cli_env, home_settings  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--settle", type=float, default=5.0, help="Seconds of load between faults.")
    args = parser.parse_args()
    fast_sweeps = (
        "APPLIANCE_JOB_HEARTBEAT_STALE_S=5\nAPPLIANCE_SWEEP_INTERVAL_S=2\nAPPLIANCE_JOB_QUEUED_STALE_S=5\n"
    )
    with appliance_with_tenant("appliance-chaos-bench-", "chaos", env_file=fast_sweeps) as (home, api, key):
        result = run_chaos(
            home,
            api,
            {"Authorization": f"Bearer {key}"},
            cli_env(home),
            home_settings(home).owner_database_url,
            rounds=args.rounds,
            settle_s=args.settle,
        )
    print(table(result))
    by_fault: dict[str, list[float]] = {}
    for f in result["faults"]:
        by_fault.setdefault(f["fault"], []).append(f["recovery_s"])
    for fault, times in by_fault.items():
        print(
            f"{fault}: recovery median {statistics.median(times):.1f} s, "
            f"max {max(times):.1f} s over {len(times)}"
        )
    print(json.dumps({k: v for k, v in result.items() if k != "faults"}))


if __name__ == "__main__":
    main()
