"""API fuzzing (issue 9, item 2): schemathesis generates requests from the appliance's own OpenAPI
schema and sends them over HTTP to a running appliance (uvicorn on loopback, in a thread, serving its
own app instance on the session's Postgres, Redis and LLM server).

Each example is sent as one principal, in turn: tenant A's admin, tenant A's viewer, tenant B's
admin or the system admin. In every other round the path and query ids are replaced by real ones of
that principal's tenant (a document, version, job, spare key, download token), so the success paths
are fuzzed too, not only the 404s that random UUIDs get.

Checks on every response:
- no 5xx (`not_a_server_error`);
- the status code, content type, headers and body are ones the schema declares for the operation
  (`status_code_conformance`, `content_type_conformance`, `response_headers_conformance`,
  `response_schema_conformance`);
- every error (>= 400) is `application/problem+json` with a string `code` (`problem_json`, below).

Bounded and reproducible for CI: a fixed seed, deterministic generation, MAX_EXAMPLES per operation
in the fuzzing phase plus schemathesis' deterministic examples and coverage phases, no shrinking and
no example database. A summary (operations, examples, status codes, failures) is printed at the end
and, when APPLIANCE_FUZZ_REPORT names a file, written there as JSON.

Run: .venv/bin/pytest tests/security/test_fuzz.py
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import schemathesis
import uvicorn
from fastapi import FastAPI
from schemathesis import Case, CheckContext, Response

from appliance.api import create_app
from appliance.db.engine import Database
from appliance.errors import PROBLEM_MEDIA_TYPE
from appliance.settings import Settings
from tests.conftest import free_port
from tests.factories import bearer, ingest_pending, make_key, make_tenant
from tests.security.conftest import add_summary

MAX_EXAMPLES = 10  # per operation, fuzzing phase; the examples and coverage phases add their own
SEED = 20_260_609
# Generation length does not exercise the API's contract, only the CPU: valid max_tokens above this
# are lowered to it (invalid ones are left alone, so they still must be rejected).
LLM_TOKENS = 16
PRINCIPALS = ("a_admin", "a_viewer", "b_admin", "system")

CONFIG = schemathesis.Config.from_dict(
    {
        "seed": SEED,
        "request-timeout": 60,
        "generation": {
            "max-examples": MAX_EXAMPLES,
            "deterministic": True,
            "no-shrink": True,
            "database": "none",
        },
        # The built-in checks this suite asserts (problem_json, below, is added to them); the others
        # (negative_data_rejection, positive_data_acceptance, ...) judge generation, not the contract.
        "checks": {
            "enabled": False,
            **{
                name: {"enabled": True}
                for name in (
                    "not_a_server_error",
                    "status_code_conformance",
                    "content_type_conformance",
                    "response_headers_conformance",
                    "response_schema_conformance",
                )
            },
        },
        "phases": {
            "examples": {"enabled": True},
            # Every boundary and negative case the schema defines; unexpected methods: one (PATCH) is
            # enough to hold the 405 to problem+json on every path.
            "coverage": {"enabled": True, "unexpected-methods": ["PATCH"]},
            "fuzzing": {"enabled": True},
            "stateful": {"enabled": False},
        },
    }
)

DOC_TEXT = "Fuzz target: the cooling tower is descaled every spring by the facilities team."


def problem_json(ctx: CheckContext, response: Response, case: Case) -> bool | None:
    """Every error response is problem+json (RFC 9457) carrying the appliance's stable `code`."""
    if response.status_code < 400:
        return None
    content_type = (response.headers.get("content-type") or [""])[0].split(";")[0].strip()
    assert content_type == PROBLEM_MEDIA_TYPE, (
        f"{response.status_code} with content type {content_type!r}, not {PROBLEM_MEDIA_TYPE}"
    )
    body = json.loads(response.content or b"null")
    assert isinstance(body, dict) and isinstance(body.get("code"), str) and body["code"], (
        f"{response.status_code} problem without a code: {response.content[:200]!r}"
    )
    assert body.get("status") == response.status_code, f"problem status {body.get('status')} differs"
    return True


@dataclass
class Stats:
    examples: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    principals: Counter[str] = field(default_factory=Counter)
    real_ids: int = 0
    failures: list[str] = field(default_factory=list)


@dataclass
class Target:
    url: str
    keys: dict[str, str]
    ids: dict[str, dict[str, str]]  # principal -> path/query parameter -> a real id of its tenant
    http: Any  # a requests.Session, reused across examples
    stats: dict[str, Stats] = field(default_factory=lambda: defaultdict(Stats))


class ServerThread:
    """The appliance's API on loopback: uvicorn with its own app (own engine, pool and event loop)."""

    def __init__(self, app: FastAPI) -> None:
        self.port = free_port()
        config = uvicorn.Config(
            app, host="127.0.0.1", port=self.port, log_level="warning", access_log=False, lifespan="on"
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="fuzz-appliance", daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the appliance did not start for fuzzing")
            time.sleep(0.05)
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
async def fuzz_ids(
    client: httpx.AsyncClient, app: FastAPI, app_db: Database, system_key: str
) -> AsyncIterator[tuple[dict[str, str], dict[str, dict[str, str]]]]:
    """Two tenants with a document each (A's indexed, so search and answers return passages), keys for
    every principal and, per principal, real ids to put into paths and queries."""
    keys: dict[str, str] = {"system": system_key}
    ids: dict[str, dict[str, str]] = {}
    tenants = {"a": await make_tenant(app_db), "b": await make_tenant(app_db)}
    for name, tenant in tenants.items():
        keys[f"{name}_admin"] = tenant.key
        docs = []
        for label in ("kept", "doomed"):
            r = await client.post(
                "/api/v1/documents",
                content=f"{DOC_TEXT} {name} {label}".encode(),
                headers={"Content-Type": "text/plain", "X-Filename": f"{label}.txt", **bearer(tenant.key)},
            )
            assert r.status_code == 201, r.text
            docs.append(r.json())
        assert set(await ingest_pending(app, tenant.id)) == {"succeeded"}
        jobs = (await client.get("/api/v1/jobs", headers=bearer(tenant.key))).json()["items"]
        r = await client.post(
            f"/api/v1/documents/{docs[0]['id']}/download-url",
            json={"expires_in": 3600},
            headers=bearer(tenant.key),
        )
        spare_key, _ = await make_key(app_db, tenant.id)
        cards = (await client.get("/v1/models", headers=bearer(tenant.key))).json()["data"]
        ids[f"{name}_admin"] = {
            **{f"{c['purpose']}_model": c["id"] for c in cards},
            "document_id": docs[0]["id"],
            "doomed_document_id": docs[1]["id"],
            "version_id": docs[0]["current_version"]["id"],
            "job_id": jobs[0]["id"],
            "key_id": str(spare_key),
            "tenant_id": str(tenant.id),
            "token": r.json()["url"].rsplit("/", 1)[1],
        }
    _, keys["a_viewer"] = await make_key(app_db, tenants["a"].id, role="viewer")
    ids["a_viewer"] = ids["a_admin"]
    ids["system"] = ids["a_admin"]  # system admins name a tenant: A's
    yield keys, ids


@pytest.fixture(scope="module")
def fuzz_target(
    request: pytest.FixtureRequest,
    settings: Settings,
    llm_server: str,
    fuzz_ids: tuple[dict[str, str], dict[str, dict[str, str]]],
) -> Iterator[Target]:
    import requests

    keys, ids = fuzz_ids
    with ServerThread(create_app(settings)) as url, requests.Session() as http:
        target = Target(url=url, keys=keys, ids=ids, http=http)
        yield target
    add_summary(request.config, "schemathesis fuzz summary", _report(target))


def _openapi() -> dict[str, Any]:
    """The app's schema at collection time (schemathesis makes one test per operation from it): an app
    object that is never started, logging as the test session configures it. test_served_schema_is_
    the_fuzzed_one proves the running appliance serves this same schema."""
    return create_app(Settings.model_construct(log_level="WARNING", log_json=False)).openapi()


schema = schemathesis.openapi.from_dict(_openapi(), config=CONFIG)


def test_served_schema_is_the_fuzzed_one(fuzz_target: Target) -> None:
    served = fuzz_target.http.get(f"{fuzz_target.url}/openapi.json", timeout=30).json()
    assert served == schema.raw_schema


def _use_real_ids(case: Case, ids: dict[str, str]) -> int:
    """Swap the generated ids for real ones of the principal's tenant."""
    swapped = 0
    if isinstance(case.body, dict) and isinstance(case.body.get("model"), str):
        purpose = "embedding" if case.path.endswith("/embeddings") else "chat"
        case.body["model"] = ids[f"{purpose}_model"]
        swapped += 1
    for container in (case.path_parameters, case.query):
        if not container:
            continue
        for name in list(container):
            real = ids.get(name)
            if real is None:
                continue
            if case.method.upper() == "DELETE" and name == "document_id":
                real = ids["doomed_document_id"]  # the kept document stays for the other operations
            container[name] = real
            swapped += 1
    return swapped


def _cap_generation(case: Case) -> None:
    if not isinstance(case.body, dict):
        return
    for name, ceiling in (("max_tokens", 8192), ("max_completion_tokens", 8192)):
        value = case.body.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and LLM_TOKENS < value <= ceiling:
            case.body[name] = LLM_TOKENS


@schema.parametrize()
def test_api_conforms_to_its_schema(case: Case, fuzz_target: Target) -> None:
    stats = fuzz_target.stats[case.operation.label]
    # Round-robin over the principals, with and without real ids, by the example's position: as
    # reproducible as the generation itself (schemathesis' examples phase admits no other strategy).
    principal = PRINCIPALS[stats.examples % len(PRINCIPALS)]
    if (stats.examples // len(PRINCIPALS)) % 2 == 0:
        stats.real_ids += _use_real_ids(case, fuzz_target.ids[principal])
    _cap_generation(case)
    response = case.call(
        base_url=fuzz_target.url, session=fuzz_target.http, headers=bearer(fuzz_target.keys[principal])
    )
    stats.examples += 1
    stats.statuses[response.status_code] += 1
    stats.principals[principal] += 1
    try:
        case.validate_response(response, additional_checks=[problem_json])
    except BaseException as exc:
        stats.failures.append(f"{principal} {response.status_code}: {str(exc).strip()[:400]}")
        raise


def _report(target: Target) -> list[str]:
    stats = target.stats
    statuses: Counter[int] = Counter()
    for s in stats.values():
        statuses.update(s.statuses)
    failures = {op: s.failures for op, s in stats.items() if s.failures}
    per_operation = {
        op: {
            "examples": s.examples,
            "statuses": dict(sorted(s.statuses.items())),
            "failures": len(s.failures),
        }
        for op, s in sorted(stats.items())
    }
    summary: dict[str, Any] = {
        "schemathesis": schemathesis.__version__,
        "seed": SEED,
        "max_examples": MAX_EXAMPLES,
        "operations": len(stats),
        "examples": sum(s.examples for s in stats.values()),
        "real_ids_swapped_in": sum(s.real_ids for s in stats.values()),
        "statuses": dict(sorted(statuses.items())),
        "failures": sum(len(f) for f in failures.values()),
        "per_operation": per_operation,
        "failure_samples": {op: f[:3] for op, f in failures.items()},
    }
    lines = [
        f"schemathesis {summary['schemathesis']}, seed {SEED}, max_examples {MAX_EXAMPLES} (fuzzing phase)",
        f"  operations tested: {summary['operations']}, examples sent: {summary['examples']}, "
        f"failures: {summary['failures']}",
        f"  status codes: {summary['statuses']}",
    ]
    for op, o in per_operation.items():
        lines.append(f"  {op:<58} {o['examples']:>4} examples  {o['statuses']}  failures {o['failures']}")
    for op, samples in failures.items():
        for sample in samples[:3]:
            lines.append(f"  FAIL {op}: {sample}")
    path = os.environ.get("APPLIANCE_FUZZ_REPORT")
    if path:
        with open(path, "w") as f:
            json.dump(summary, f, indent=2)
    return lines
