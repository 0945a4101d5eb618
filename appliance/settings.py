"""One settings object for every process (API, workers, CLI).

Values come from `APPLIANCE_*` environment variables, then from `$APPLIANCE_HOME/appliance.env`
(written by `appliance up` on first run, mode 0600, holding generated passwords and ports), then
from the defaults below. Nothing here is secret by default: secrets are generated per install.
"""

from __future__ import annotations

import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def default_home() -> Path:
    return Path(os.environ.get("APPLIANCE_HOME") or Path.cwd() / "var").resolve()


def env_file_path(home: Path | None = None) -> Path:
    return (home or default_home()) / "appliance.env"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="APPLIANCE_",
        extra="ignore",
        env_file_encoding="utf-8",
    )

    environment: Literal["production", "development", "test"] = "production"
    home: Path = Field(default_factory=default_home)

    # Network: everything binds to loopback in the embedded mode; TLS is the proxy's job.
    host: str = "127.0.0.1"
    api_port: int = 8470
    api_workers: int = 2
    worker_processes: int = 1
    worker_threads: int = 2
    # Extraction children forked from a per-worker zygote (appliance/extract/zygote.py); false: each
    # child is started as a new Python process (slower by ~60 ms of CPU a document; same sandbox).
    extract_zygote: bool = True
    service_user: str = "appliance"

    # Postgres. In embedded mode the cluster lives in $home/postgres and these are generated.
    pg_host: str = "127.0.0.1"
    pg_port: int = 54329
    pg_database: str = "appliance"
    pg_superuser: str = "postgres"
    pg_superuser_password: SecretStr | None = None
    pg_owner_user: str = "appliance_owner"
    pg_owner_password: SecretStr | None = None
    pg_app_user: str = "appliance_app"
    pg_app_password: SecretStr | None = None
    pg_embedded: bool = True
    db_pool_size: int = 5
    # Memory of the embedded cluster, in Postgres units ("2GB", "512MB"). None: sized from the memory
    # this machine (or its cgroup) gives the appliance (`runtime.postgres.memory_settings`):
    # shared_buffers 25% (16GB at most), effective_cache_size 50%, maintenance_work_mem 1/16 (64MB to
    # 2GB: HNSW builds), work_mem 16MB. The test environment keeps Postgres's own small defaults.
    pg_shared_buffers: str | None = None
    pg_effective_cache_size: str | None = None
    pg_maintenance_work_mem: str | None = None
    pg_work_mem: str | None = None

    # Redis.
    redis_host: str = "127.0.0.1"
    redis_port: int = 63790
    redis_password: SecretStr | None = None
    redis_db: int = 0
    redis_embedded: bool = True

    # Object storage: the filesystem store under $home/objects unless an S3 endpoint is set.
    s3_endpoint: str | None = None  # host:port (or a URL); when set, objects go to S3 instead
    s3_access_key: SecretStr | None = None
    s3_secret_key: SecretStr | None = None
    s3_bucket: str = "appliance"
    s3_region: str = "us-east-1"
    s3_secure: bool = False

    # Models. Names are manifest names (models/manifest.toml); None: the manifest's first of that purpose.
    models_dir: Path = PROJECT_ROOT / "models"
    embedding_model: str | None = None
    chat_model: str | None = None
    embedding_threads: int | None = None  # llama.cpp threads per embedder; None: every CPU available
    # Layers of the embedding model offloaded to the GPU (-1: all) where llama-cpp-python was built
    # with CUDA (compose/Dockerfile.cuda, the gpu-worker service); 0 keeps it on the CPU.
    embedding_gpu_layers: int = 0

    # The LLM server: one process holds the chat model (an 8–70B model must not be loaded once per API
    # worker); API processes talk to it over loopback HTTP (llama-cpp-python's OpenAI-compatible server).
    # llm_url: an external OpenAI-compatible server (a GPU host) instead of the embedded one.
    llm_port: int = 8471
    llm_url: str | None = None
    llm_threads: int | None = None
    llm_concurrency: int = 1  # generations in flight per API process (the server runs one at a time)
    llm_queue_size: int = 8  # waiting generations per API process beyond which callers get 503
    llm_queue_timeout_s: float = 30.0  # the longest a request waits for its turn before a 503
    llm_timeout_s: float = 120.0  # one generation, start to end
    answer_max_tokens: int = 384
    answer_context_chunks: int = 6
    # A question whose best passage scores below this (cosine similarity, no full-text match) is
    # answered "not found in the documents" without asking the LLM to guess.
    answer_min_similarity: float = 0.25

    # Search.
    # Full text (BM25): candidates are the chunks holding the query's rarest lexemes, taken until their
    # document frequencies add up to this fraction of the tenant's chunks (within the minimum and
    # maximum: a small tenant has every match scored, a huge one a bounded number).
    search_fulltext_candidate_fraction: float = Field(default=0.02, gt=0, le=1)
    search_fulltext_min_candidates: int = Field(default=500, ge=1)
    search_fulltext_max_candidates: int = Field(default=20_000, ge=100)
    search_hnsw_ef_search: int = 100
    search_candidates: int = 100  # per mode, before fusion
    search_rrf_k: int = 60
    search_vector_weight: float = 1.0
    search_fulltext_weight: float = 1.0
    search_cache_ttl_s: int = 300

    # Enrichment jobs (docs/enrichment.md), asked for per upload with ?summarize=true / ?classify=true.
    summary_max_tokens: int = 256  # the summary's length (and each partial summary's, for long documents)
    summary_max_chunks: int = 200  # longer documents are summarised from this many chunks, evenly spread
    # classify by embedding: labels whose cosine similarity to the document reaches the threshold are
    # assigned (the best one always is), at most classify_max_labels of them. all-minilm-l6-v2 puts
    # related label/document pairs around 0.3-0.6 and unrelated ones below 0.2 (tests/enrich measure it).
    classify_threshold: float = 0.3
    classify_max_labels: int = 5

    # Keys.
    master_key_file: Path | None = None
    # Alternative to the key file: derive the master key from a passphrase (Argon2id). Supply it at
    # start (environment or a secrets file), never in appliance.env.
    master_key_passphrase: SecretStr | None = None

    # Backups (docs/backup.md): archives are encrypted to an age public key. The secret half
    # (backup.key) is needed only to verify and restore: keep a copy offline; it may leave the host.
    backup_dir: Path | None = None  # default $home/backups
    backup_recipient_file: Path | None = None  # default $home/keys/backup.pub
    backup_identity_file: Path | None = None  # default $home/keys/backup.key

    # Documents.
    max_upload_bytes: int = 2 * 1024**3
    blob_segment_bytes: int = 256 * 1024
    download_url_max_seconds: int = 7 * 24 * 3600

    # Jobs: a running job whose heartbeat is older than this is re-driven (its worker died); a queued
    # job not picked up for job_queued_stale_s is sent again; the sweeper looks every sweep_interval_s.
    job_heartbeat_stale_s: int = 120
    job_queued_stale_s: int = 600
    sweep_interval_s: int = 30
    # Audit: the sweeper signs a checkpoint over the chain head when the last one is older than this
    # (and the chain has grown since). docs/audit.md.
    audit_checkpoint_interval_s: int = Field(default=300, ge=1)

    # Rate limits (docs/security.md), in Redis: per API key (rate_limit_*) and per tenant
    # (tenant_rate_limit_*), per route class, in `limits` notation ("600/minute", "10/second;1000/hour");
    # "" or "none": no limit. Generous defaults: they stop a runaway client, not normal use.
    rate_limits_enabled: bool = True
    rate_limit_upload: str = "300/minute"
    rate_limit_search: str = "1200/minute"
    rate_limit_answers: str = "120/minute"
    rate_limit_openai: str = "600/minute"
    rate_limit_default: str = "3000/minute"
    tenant_rate_limit_upload: str = "1200/minute"
    tenant_rate_limit_search: str = "6000/minute"
    tenant_rate_limit_answers: str = "600/minute"
    tenant_rate_limit_openai: str = "3000/minute"
    tenant_rate_limit_default: str = "12000/minute"
    # Concurrency quotas per tenant (0: none): uploads and generations (answers, chat) in flight at once,
    # across all API processes. A slot whose process died is freed after quota_lease_s.
    tenant_max_concurrent_uploads: int = Field(default=16, ge=0)
    tenant_max_concurrent_generations: int = Field(default=8, ge=0)
    quota_lease_s: float = Field(default=60.0, gt=0)

    # Edges (docs/security.md): request bodies other than uploads (JSON), header block size, the longest
    # wait for the next piece of a request body, and CORS (off unless origins are listed, as JSON:
    # APPLIANCE_CORS_ORIGINS='["https://app.example"]').
    max_json_body_bytes: int = Field(default=2 * 1024**2, ge=1024)
    max_header_bytes: int = Field(default=16 * 1024, ge=1024)
    request_body_timeout_s: float = Field(default=60.0, gt=0)
    cors_origins: list[str] = Field(default_factory=list)

    log_level: str = "INFO"
    log_json: bool = True

    @field_validator(
        "rate_limit_upload",
        "rate_limit_search",
        "rate_limit_answers",
        "rate_limit_openai",
        "rate_limit_default",
        "tenant_rate_limit_upload",
        "tenant_rate_limit_search",
        "tenant_rate_limit_answers",
        "tenant_rate_limit_openai",
        "tenant_rate_limit_default",
    )
    @classmethod
    def _rate_limit_notation(cls, value: str) -> str:
        from appliance.ratelimit import parse_limit

        try:
            parse_limit(value)
        except ValueError as exc:
            raise ValueError(f"{value!r} is not a rate limit such as '600/minute': {exc}") from exc
        return value

    @field_validator("pg_shared_buffers", "pg_effective_cache_size", "pg_maintenance_work_mem", "pg_work_mem")
    @classmethod
    def _pg_memory_notation(cls, value: str | None) -> str | None:
        if value is None or re.fullmatch(r"[1-9][0-9]*(kB|MB|GB|TB)", value.strip()):
            return value.strip() if value else value
        raise ValueError(f"{value!r} is not a Postgres memory size such as '512MB' or '2GB'")

    @model_validator(mode="after")
    def _refuse_unsafe(self) -> Settings:
        loopback = self.host in ("127.0.0.1", "::1", "localhost")
        # Binding beyond loopback is allowed, but only behind the TLS proxy of the compose setup.
        if (
            self.environment == "production"
            and not loopback
            and os.environ.get("APPLIANCE_ALLOW_PUBLIC_BIND") != "1"
        ):
            raise ValueError(
                f"refusing to bind the API to {self.host}: set APPLIANCE_ALLOW_PUBLIC_BIND=1 "
                "when a TLS reverse proxy fronts it"
            )
        return self

    # Derived paths -----------------------------------------------------------------------------
    @property
    def pg_data_dir(self) -> Path:
        return self.home / "postgres" / "data"

    @property
    def run_dir(self) -> Path:
        return self.home / "run"

    @property
    def log_dir(self) -> Path:
        return self.home / "logs"

    @property
    def redis_dir(self) -> Path:
        return self.home / "redis"

    @property
    def objects_dir(self) -> Path:
        return self.home / "objects"

    @property
    def keys_dir(self) -> Path:
        return self.home / "keys"

    @property
    def master_key_path(self) -> Path:
        return self.master_key_file or self.keys_dir / "master.key"

    @property
    def url_signing_key_path(self) -> Path:
        return self.keys_dir / "url-signing.key"

    @property
    def audit_signing_key_path(self) -> Path:
        """Ed25519 private key that signs audit checkpoints (raw 32 bytes or PEM, 0600)."""
        return self.keys_dir / "audit-signing.key"

    @property
    def audit_signing_pubkey_path(self) -> Path:
        """Its public key (PEM): what auditors verify exports with."""
        return self.keys_dir / "audit-signing.pub"

    @property
    def backups_path(self) -> Path:
        return self.backup_dir or self.home / "backups"

    @property
    def backup_recipient_path(self) -> Path:
        return self.backup_recipient_file or self.keys_dir / "backup.pub"

    @property
    def backup_identity_path(self) -> Path:
        return self.backup_identity_file or self.keys_dir / "backup.key"

    @property
    def tmp_dir(self) -> Path:
        """Staging for uploads (already encrypted): on the data disk, never in /tmp."""
        return self.home / "tmp"

    @property
    def api_url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host
        return f"http://{host}:{self.api_port}"

    # Connection URLs ---------------------------------------------------------------------------
    def _pg_url(self, driver: str, user: str, password: SecretStr | None) -> str:
        from sqlalchemy.engine import URL

        return URL.create(
            f"postgresql+{driver}",
            username=user,
            password=password.get_secret_value() if password else None,
            host=self.pg_host,
            port=self.pg_port,
            database=self.pg_database,
        ).render_as_string(hide_password=False)

    @property
    def app_database_url(self) -> str:
        """The non-owner role the API and workers use: subject to row-level security."""
        return self._pg_url("psycopg", self.pg_app_user, self.pg_app_password)

    @property
    def owner_database_url(self) -> str:
        """The owner role: migrations, audit verification and admin tasks only."""
        return self._pg_url("psycopg", self.pg_owner_user, self.pg_owner_password)

    @property
    def llm_base_url(self) -> str:
        """Where the chat model answers (OpenAI-compatible): the external server or the embedded one."""
        return (self.llm_url or f"http://127.0.0.1:{self.llm_port}").rstrip("/")

    @property
    def redis_url(self) -> str:
        auth = f":{self.redis_password.get_secret_value()}@" if self.redis_password else ""
        return f"redis://{auth}{self.redis_host}:{self.redis_port}/{self.redis_db}"


def load_settings(home: Path | None = None, **overrides: Any) -> Settings:
    """Build settings, reading `$home/appliance.env` when it exists."""
    env_file = env_file_path(home)
    kwargs: dict[str, Any] = dict(overrides)
    secrets_dir = os.environ.get("APPLIANCE_SECRETS_DIR")
    if secrets_dir and Path(secrets_dir).is_dir():
        # Docker/Kubernetes secrets: one file per setting, named like its variable.
        kwargs["_secrets_dir"] = secrets_dir
    if home is not None:
        kwargs.setdefault("home", home)
    return Settings(_env_file=env_file if env_file.exists() else None, **kwargs)


def invalid_settings_line(exc: ValidationError) -> str:
    """One line for a `Settings` validation error: the first bad setting, by its environment
    variable, and why (the CLI's message; pydantic's own text spans several lines)."""
    errors = exc.errors()
    first = errors[0]
    field = ".".join(str(part) for part in first["loc"])
    where = f"APPLIANCE_{field.upper()}" if field else "settings"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"invalid settings: {where}: {first['msg']}{more}"


@lru_cache
def get_settings() -> Settings:
    return load_settings()
