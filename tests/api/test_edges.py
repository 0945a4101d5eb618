"""Edge limits (appliance.edges), CORS off unless configured, constant-time key comparison, and the
API server's worker settings (appliance.runtime.uvicorn)."""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from appliance.api import create_app
from appliance.auth import keys
from appliance.db.engine import Database
from appliance.runtime import uvicorn as worker
from appliance.settings import Settings
from tests.api.test_rate_limits import limited, running
from tests.factories import bearer, make_tenant

PROBLEM = "application/problem+json"


async def test_json_body_limit_by_length_and_by_stream(settings: Settings, app_db: Database) -> None:
    s = limited(settings, max_json_body_bytes=2048)
    t = await make_tenant(app_db)
    big = {"query": "x" * 1500, "mode": "fulltext", "filters": {"metadata": {"pad": "y" * 3000}}}
    async with running(create_app(s)) as (c,):
        r = await c.post("/api/v1/search", json=big, headers=bearer(t.key))
        assert r.status_code == 413 and r.headers["content-type"] == PROBLEM
        assert r.json()["code"] == "body_too_large"

        async def chunked() -> AsyncIterator[bytes]:  # no Content-Length: counted as it arrives
            for _ in range(5):
                yield b" " * 1000

        r = await c.post(
            "/api/v1/search",
            content=chunked(),
            headers={**bearer(t.key), "Content-Type": "application/json"},
        )
        assert r.status_code == 413 and r.json()["code"] == "body_too_large", r.text
        # Uploads are not JSON bodies: their own limit (max_upload_bytes) applies, even to a .json file.
        r = await c.post(
            "/api/v1/documents",
            content=b'{"pad": "' + b"z" * 5000 + b'"}',
            headers={**bearer(t.key), "Content-Type": "application/json", "X-Filename": "data.json"},
        )
        assert r.status_code == 201, r.text
        # Under the limit: served.
        r = await c.post("/api/v1/search", json={"query": "ok", "mode": "fulltext"}, headers=bearer(t.key))
        assert r.status_code == 200, r.text


async def test_header_block_limit(settings: Settings, app_db: Database) -> None:
    s = limited(settings, max_header_bytes=4096)
    t = await make_tenant(app_db)
    async with running(create_app(s)) as (c,):
        r = await c.get("/api/v1/whoami", headers={**bearer(t.key), "X-Padding": "p" * 5000})
        assert r.status_code == 431 and r.headers["content-type"] == PROBLEM
        assert r.json()["code"] == "headers_too_large"
        assert (await c.get("/api/v1/whoami", headers=bearer(t.key))).status_code == 200


async def test_a_client_that_stalls_its_body_gets_408(settings: Settings, app_db: Database) -> None:
    s = limited(settings, request_body_timeout_s=0.3)
    t = await make_tenant(app_db)

    async def stalls() -> AsyncIterator[bytes]:
        yield b'{"query": '
        await asyncio.sleep(5)
        yield b'"late"}'

    async with running(create_app(s)) as (c,):
        r = await c.post(
            "/api/v1/search",
            content=stalls(),
            headers={**bearer(t.key), "Content-Type": "application/json"},
        )
        assert r.status_code == 408 and r.json()["code"] == "request_timeout", r.text
        # A stalled raw upload too.
        r = await c.post(
            "/api/v1/documents",
            content=stalls(),
            headers={**bearer(t.key), "Content-Type": "text/plain", "X-Filename": "slow.txt"},
        )
        assert r.status_code == 408, r.text


async def test_cors_is_off_by_default(client: httpx.AsyncClient) -> None:
    preflight = {"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}
    r = await client.options("/api/v1/search", headers=preflight)
    assert not any(h.startswith("access-control-") for h in r.headers)
    r = await client.get("/healthz", headers={"Origin": "https://evil.example"})
    assert not any(h.startswith("access-control-") for h in r.headers)


async def test_cors_allows_only_the_configured_origins(settings: Settings, app_db: Database) -> None:
    s = limited(settings, cors_origins=["https://app.example"])
    t = await make_tenant(app_db)
    async with running(create_app(s)) as (c,):
        r = await c.options(
            "/api/v1/search",
            headers={
                "Origin": "https://app.example",
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization,content-type",
            },
        )
        assert r.status_code == 200
        assert r.headers["access-control-allow-origin"] == "https://app.example"
        r = await c.get("/api/v1/whoami", headers={**bearer(t.key), "Origin": "https://app.example"})
        assert r.headers["access-control-allow-origin"] == "https://app.example"
        assert "ratelimit-remaining" in r.headers["access-control-expose-headers"].lower()
        r = await c.get("/api/v1/whoami", headers={**bearer(t.key), "Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in r.headers


def test_api_keys_are_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[Any, Any]] = []
    real = hmac.compare_digest

    def spy(a: Any, b: Any) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(keys.hmac, "compare_digest", spy)
    new = keys.generate_key()
    assert keys.matches(new.plaintext, new.secret_hash)
    wrong = new.plaintext[:-1] + ("A" if new.plaintext[-1] != "A" else "B")
    assert not keys.matches(wrong, new.secret_hash)
    # Both comparisons went through hmac.compare_digest, on fixed-length digests (never the key itself).
    assert len(calls) == 2 and all(len(a) == len(b) == 32 for a, b in calls)
    assert all(new.plaintext.encode() not in (a, b) for a, b in calls)


def test_api_worker_bounds_headers_and_connections() -> None:
    kwargs = worker.config_kwargs()
    assert kwargs["http"] is worker.BoundedHttpToolsProtocol
    assert kwargs["limit_concurrency"] == worker.MAX_CONNECTIONS_PER_WORKER
    import inspect

    from appliance.runtime import supervisor

    assert "appliance.runtime.uvicorn.ApplianceWorker" in inspect.getsource(supervisor)


class _SmallHead(worker.BoundedHttpToolsProtocol):
    head_limit = 4096


async def _echo_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    assert scope["type"] == "http"
    size = 0
    while True:
        message = await receive()
        size += len(message.get("body", b""))
        if not message.get("more_body"):
            break
    body = f"{scope['method']} {scope['path']} {size}".encode()
    await send(
        {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"%d" % len(body))]}
    )
    await send({"type": "http.response.body", "body": body})


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)).decode().split("\r\n")
    fields = dict(line.lower().split(": ", 1) for line in head[1:] if line)
    body = await asyncio.wait_for(reader.readexactly(int(fields["content-length"])), 10)
    return int(head[0].split()[1]), fields, body


async def test_api_server_bounds_the_request_head() -> None:
    """The API's HTTP protocol (httptools) refuses a head that keeps growing past its limit with 431
    problem+json and closes the connection, before the client has finished sending it; requests
    within the limit, keep-alive and pipelined ones after a large body, are served."""
    import json

    import uvicorn

    from tests.conftest import free_port

    port = free_port()
    config = uvicorn.Config(
        _echo_app, host="127.0.0.1", port=port, http=_SmallHead, lifespan="off", log_level="error"
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    try:
        for _ in range(1000):
            if server.started:
                break
            await asyncio.sleep(0.01)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /a HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"p" * 3000 + b"\r\n\r\n")
        assert (await _read_response(reader))[::2] == (200, b"GET /a 0")
        # Pipelined in one write: a 200 KB body, then the next request; no head is over the limit.
        big = b"b" * 200_000
        writer.write(
            b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(big), big)
            + b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n"
        )
        assert (await _read_response(reader))[::2] == (200, b"POST /up 200000")
        assert (await _read_response(reader))[::2] == (200, b"GET /next 0")
        # A header that never ends, sent 1 KB at a time: refused once the head passes 4096 bytes.
        writer.write(b"GET /b HTTP/1.1\r\nHost: x\r\nX-Pad: ")
        answer = asyncio.create_task(_read_response(reader))
        sent = 0
        while sent < 64_000 and not answer.done():
            writer.write(b"p" * 1024)
            await writer.drain()
            sent += 1024
            await asyncio.sleep(0.005)
        refused = await answer if answer.done() else answer.cancel() and None
        assert refused is not None, "the server kept reading a head of 64 KB"
        status, fields, body = refused
        assert status == 431 and fields["content-type"] == "application/problem+json"
        assert fields["connection"] == "close"
        assert json.loads(body)["code"] == "headers_too_large"
        assert sent <= 4096 + 3 * 1024
        assert await asyncio.wait_for(reader.read(), 10) == b""  # closed
        writer.close()
    finally:
        server.should_exit = True
        await task
