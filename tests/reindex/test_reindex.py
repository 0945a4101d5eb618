"""`appliance reindex --model`: every chunk re-embedded by another model while search keeps answering.

The "other" model is the shipped MiniLM registered a second time under another name (a symlink with
the same sha256): its vectors equal the old ones, which is what lets this test check the mechanics —
jobs, the two-model search during the switch, the switch-over, nothing missing at any step — and
restore the shared test database exactly afterwards."""

from __future__ import annotations

import shutil
import uuid
from collections.abc import AsyncIterator

import httpx
import pytest
from sqlalchemy import select, text

from appliance.api import create_app
from appliance.db.engine import Database, set_tenant
from appliance.inference.manifest import get_model, model_path
from appliance.inference.register import add_model
from appliance.ingest import reindex as rx
from appliance.ingest.pipeline import WorkerServices
from appliance.jobs.models import Job
from appliance.settings import Settings
from tests.factories import bearer, ingest_pending, make_tenant
from tests.search.conftest import upload_text

TWIN = "minilm-twin"


@pytest.fixture(scope="module")
def twin_settings(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    d = tmp_path_factory.mktemp("models")
    shutil.copy(settings.models_dir / "manifest.toml", d / "manifest.toml")
    (d / "gguf").mkdir()
    for f in (settings.models_dir / "gguf").iterdir():
        (d / "gguf" / f.name).symlink_to(f.resolve())
    spec = get_model(settings.models_dir, purpose="embedding")
    add_model(
        d,
        model_path(spec, settings.models_dir),
        sha256=spec.sha256,
        purpose="embedding",
        name=TWIN,
        link=True,
    )
    return settings.model_copy(update={"models_dir": d})


@pytest.fixture(scope="module")
async def twin_app(twin_settings: Settings, llm_server: str) -> AsyncIterator[object]:
    app = create_app(twin_settings)
    async with app.router.lifespan_context(app):
        yield app


async def tenants(db: Database) -> list[uuid.UUID]:
    async with db.transaction() as session:
        return list((await session.execute(text("SELECT id FROM tenants"))).scalars())


async def run_reindex_jobs(app: object, tenant_ids: list[uuid.UUID], limit: int | None = None) -> int:
    state = app.state  # type: ignore[attr-defined]
    svc = WorkerServices(settings=state.settings, db=state.db, keyring=state.keyring, store=state.store)
    done = 0
    for tid in tenant_ids:
        async with state.db.transaction(tenant_id=tid) as session:
            ids = (
                (await session.execute(select(Job.id).where(Job.kind == "reindex", Job.status == "queued")))
                .scalars()
                .all()
            )
        for job_id in ids:
            if limit is not None and done >= limit:
                return done
            # "skipped": its document was deleted meanwhile (its chunks are never searched again).
            assert await rx.run_reindex(svc, tid, job_id) in ("succeeded", "skipped")
            done += 1
    return done


async def restore(db: Database, settings: Settings) -> None:
    """Put the shared test database back on the shipped model (the twin's vectors are identical)."""
    shipped = rx.default_model(settings)
    async with db.transaction() as session:
        for tid in (await session.execute(text("SELECT id FROM tenants"))).scalars().all():
            await set_tenant(session, tid)
            await session.execute(
                text("UPDATE chunks SET embedding_model = :s WHERE embedding_model = :t"),
                {"s": shipped, "t": TWIN},
            )
        await session.execute(
            text("UPDATE embedding_state SET active_model = NULL, target_model = NULL WHERE id = 1")
        )


async def test_reindex_switches_models_without_a_gap(
    twin_app, twin_settings: Settings, app_db: Database
) -> None:  # type: ignore[no-untyped-def]
    app = twin_app
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        t = await make_tenant(app_db, role="editor")
        docs = {
            name: await upload_text(client, t.key, name, body)
            for name, body in {
                "boiler": "The steam boiler is inspected every six months by a certified technician.",
                "travel": "Economy class flights are booked for trips shorter than six hours.",
                "vaccine": "Influenza vaccines are offered to all staff every October.",
            }.items()
        }
        assert set(await ingest_pending(app, t.id)) == {"succeeded"}

        async def found(query: str) -> tuple[str, list[str]]:
            r = await client.post(
                "/api/v1/search", json={"query": query, "mode": "vector", "top_k": 3}, headers=bearer(t.key)
            )
            assert r.status_code == 200, r.text
            return r.json()["model"], [x["document_id"] for x in r.json()["results"]]

        model, before = await found("heating equipment inspection")
        assert model == "all-minilm-l6-v2" and before[0] == docs["boiler"] and len(before) == 3

        try:
            async with app.state.db.transaction() as session:
                started = await rx.start(session, twin_settings, TWIN)
            assert started["to"] == TWIN and started["versions"] >= 3 and not started["finished"]
            # New uploads during the switch are embedded by the target model.
            async with app.state.db.transaction() as session:
                assert await rx.ingest_model(session, twin_settings) == TWIN
            # Half-way: one version re-embedded, the rest not. Search uses both models and misses nothing.
            assert await run_reindex_jobs(app, [t.id], limit=1) == 1
            model, mid = await found("heating equipment inspection")
            assert model == f"{TWIN}+all-minilm-l6-v2"
            assert mid[0] == docs["boiler"] and sorted(mid) == sorted(before)
            async with app.state.db.transaction() as session:
                info = await rx.progress(session, twin_settings)
            assert info["target_model"] == TWIN and info["chunks_remaining"] > 0
            # Everything else (every tenant of the shared test database), then the switch-over.
            await run_reindex_jobs(app, await tenants(app_db))
            async with app.state.db.transaction() as session:
                info = await rx.progress(session, twin_settings)
                assert info == {"active_model": TWIN, "target_model": None}
                assert (
                    await session.execute(text("SELECT app_chunks_not_embedded_by(:m)"), {"m": TWIN})
                ).scalar() == 0
            model, after = await found("heating equipment inspection")
            assert model == TWIN and after == before
            # Idempotent: asking again finds nothing to do.
            async with app.state.db.transaction() as session:
                again = await rx.start(session, twin_settings, TWIN)
            assert again["versions"] == 0 and again["finished"]
        finally:
            await restore(app_db, twin_settings)


async def test_reindex_refuses_unknown_models_and_a_second_target(
    twin_settings: Settings, app_db: Database
) -> None:
    async with app_db.transaction() as session:
        with pytest.raises(rx.ReindexError, match="no model with name 'nope'"):
            await rx.start(session, twin_settings, "nope")
    chat = get_model(twin_settings.models_dir, purpose="chat").name
    async with app_db.transaction() as session:
        with pytest.raises(rx.ReindexError, match="no model with name"):
            await rx.start(session, twin_settings, chat)  # a chat model is not an embedding model


def test_cli_status_and_bad_arguments(settings: Settings) -> None:
    from tests.cli.test_cli import run_cli

    out = run_cli(settings, "reindex", "--status", "--json")
    assert out.returncode == 0, out.stderr
    assert '"active_model": "all-minilm-l6-v2"' in out.stdout
    out = run_cli(settings, "reindex")
    assert out.returncode == 1 and "give either --model NAME or --status" in out.stderr
    out = run_cli(settings, "reindex", "--model", "nope")
    assert out.returncode == 1 and "no model with name 'nope'" in out.stderr
