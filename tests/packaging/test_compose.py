"""docker-compose.prod.yml, as `docker compose config` resolves it (default and `gpu` profile)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from typing import Any

import pytest

from appliance.settings import PROJECT_ROOT, Settings
from tests.conftest import free_port
from tests.packaging.conftest import COMPOSE_FILE, clean_env, compose_command, compose_config

CORE = {"init", "api", "worker", "llm", "postgres", "redis", "minio", "tika", "proxy"}
GPU = {"gpu-worker", "llm-gpu"}
APP_IMAGES = ("appliance:", "appliance-cuda:")
# Read by the code from os.environ, not through Settings fields.
NON_FIELD_ENV = {"APPLIANCE_ALLOW_PUBLIC_BIND", "APPLIANCE_SECRETS_DIR"}


def services(cfg: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return dict(cfg["services"])


def app_services(cfg: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {n: s for n, s in services(cfg).items() if s["image"].startswith(APP_IMAGES)}


def test_config_passes_with_and_without_the_gpu_profile() -> None:
    assert set(services(compose_config())) == CORE
    assert set(services(compose_config("gpu"))) == CORE | GPU
    for profiles in ([], ["--profile", "gpu"]):
        res = subprocess.run(
            [*compose_command(), "-f", str(COMPOSE_FILE), *profiles, "config", "--quiet"],
            capture_output=True,
            text=True,
            env=clean_env(),
        )
        assert res.returncode == 0, res.stderr


def test_only_the_proxy_publishes_a_port(gpu_config: dict[str, Any]) -> None:
    published = {name: s["ports"] for name, s in services(gpu_config).items() if s.get("ports")}
    assert set(published) == {"proxy"}
    (port,) = published["proxy"]
    assert port["target"] == 8443 and port["published"] == "443"
    assert not any(s.get("expose") for s in services(gpu_config).values())


def test_one_internal_network_and_only_the_proxy_leaves_it(gpu_config: dict[str, Any]) -> None:
    nets = gpu_config["networks"]
    assert nets["internal"].get("internal") is True
    for name, svc in services(gpu_config).items():
        assert "internal" in svc["networks"], name
        if name != "proxy":
            assert set(svc["networks"]) == {"internal"}, name
    assert set(services(gpu_config)["proxy"]["networks"]) == {"internal", "edge"}


def test_every_service_has_a_healthcheck_and_a_restart_policy(gpu_config: dict[str, Any]) -> None:
    for name, svc in services(gpu_config).items():
        if name == "init":  # one-shot: the others wait for it to complete successfully
            assert svc["restart"] == "no"
            assert "healthcheck" not in svc
            continue
        assert svc["restart"] == "unless-stopped", name
        check = svc.get("healthcheck") or {}
        assert check.get("test") and not check.get("disable"), name
        assert check["test"][0] in ("CMD", "CMD-SHELL"), name
    for name in ("api", "worker"):
        deps = services(gpu_config)[name]["depends_on"]
        assert deps["init"]["condition"] == "service_completed_successfully"
        assert deps["redis"]["condition"] == "service_healthy"
        assert deps["postgres"]["condition"] == "service_healthy"


def test_every_service_has_resource_limits_and_is_hardened(gpu_config: dict[str, Any]) -> None:
    for name, svc in services(gpu_config).items():
        limits = svc.get("deploy", {}).get("resources", {}).get("limits", {})
        assert limits.get("memory") and limits.get("cpus"), name
        assert "no-new-privileges:true" in svc.get("security_opt", []), name
        assert svc.get("cap_drop") == ["ALL"], name
        assert svc.get("read_only") is True, name
        assert "/tmp" in svc.get("tmpfs", []), name


def test_app_services_are_read_only_with_models_mounted_read_only(gpu_config: dict[str, Any]) -> None:
    apps = app_services(gpu_config)
    assert set(apps) == {"init", "api", "worker", "llm"} | GPU
    for name, svc in apps.items():
        assert svc["read_only"] is True, name
        models = [v for v in svc["volumes"] if v["target"] == "/models"]
        assert len(models) == 1 and models[0]["read_only"] is True, name
        assert models[0]["source"] == str(PROJECT_ROOT / "models")
        data = [v for v in svc["volumes"] if v["target"] == "/var/lib/appliance"]
        assert data and data[0]["type"] == "volume", name
        assert "user" not in svc or svc["user"] not in ("0", "root"), name  # the image's USER 10001


def test_images_are_pinned(gpu_config: dict[str, Any]) -> None:
    for name, svc in services(gpu_config).items():
        image = svc["image"]
        assert "@sha256:" in image or re.search(r":[\w][\w.-]*$", image.split("/")[-1]), (name, image)
        assert not image.endswith(":latest"), (name, image)
        tag = image.rsplit(":", 1)[-1]
        if not svc["image"].startswith(APP_IMAGES):  # third-party: an exact version, not a moving major
            assert re.search(r"\d+\.\d+|RELEASE\.\d{4}-\d\d-\d\dT", tag), (name, image)


def test_secrets_are_files_and_no_secret_sits_in_the_environment(gpu_config: dict[str, Any]) -> None:
    for name, secret in gpu_config["secrets"].items():
        assert secret.get("file", "").startswith(str(PROJECT_ROOT / "secrets") + "/"), name
        assert "environment" not in secret, name
    secretish = re.compile(r"PASSWORD|SECRET|TOKEN|_KEY$|ROOT_USER$")
    for name, svc in services(gpu_config).items():
        for var, value in (svc.get("environment") or {}).items():
            if secretish.search(var) and var != "APPLIANCE_SECRETS_DIR":
                assert var.endswith("_FILE"), (name, var)
                assert str(value).startswith("/run/secrets/"), (name, var)
        for ref in svc.get("secrets", []):
            assert ref["source"] in gpu_config["secrets"], (name, ref)
    # The API, workers and LLM server get the application role only; owner and superuser: init only.
    for name, svc in app_services(gpu_config).items():
        mounted = {ref["source"] for ref in svc.get("secrets", [])}
        if name != "init":
            assert not mounted & {"APPLIANCE_PG_OWNER_PASSWORD", "APPLIANCE_PG_SUPERUSER_PASSWORD"}, name


def test_app_settings_match_the_code(gpu_config: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """Every APPLIANCE_* variable and secret is a real setting (a typo would be ignored silently)."""
    fields = set(Settings.model_fields)
    for name, svc in app_services(gpu_config).items():
        env = svc.get("environment") or {}
        for var in env:
            if var.startswith("APPLIANCE_") and var not in NON_FIELD_ENV:
                assert var.removeprefix("APPLIANCE_").lower() in fields, (name, var)
        for ref in svc.get("secrets", []):
            if ref["source"].startswith("APPLIANCE_"):
                assert ref["source"].removeprefix("APPLIANCE_").lower() in fields, (name, ref)
                assert ref.get("target", ref["source"]) in (ref["source"], f"/run/secrets/{ref['source']}")
        assert env["APPLIANCE_SECRETS_DIR"] == "/run/secrets"
        assert env["APPLIANCE_MASTER_KEY_FILE"] == "/run/secrets/master_key"
        assert any(r["source"] == "master_key" for r in svc.get("secrets", [])) or name.startswith("llm")
        assert env["APPLIANCE_PG_HOST"] == "postgres" and env["APPLIANCE_REDIS_HOST"] == "redis"
        assert env["APPLIANCE_S3_ENDPOINT"] == "minio:9000"
        assert env["APPLIANCE_LLM_URL"] == "http://llm:8471"
        with monkeypatch.context() as m:  # the settings the container builds from this environment
            for var, value in env.items():
                m.setenv(var, str(value))
            m.delenv("APPLIANCE_SECRETS_DIR")
            settings = Settings(_env_file=None)  # type: ignore[call-arg]
        assert settings.pg_embedded is False and settings.redis_embedded is False, name
        assert str(settings.models_dir) == "/models" and settings.llm_base_url == "http://llm:8471"


def test_worker_scales_and_gpu_services_reserve_a_gpu(gpu_config: dict[str, Any]) -> None:
    svcs = services(gpu_config)
    for name in ("worker", "gpu-worker"):
        assert "container_name" not in svcs[name] and not svcs[name].get("ports"), name
    for name in GPU:
        svc = svcs[name]
        assert svc["profiles"] == ["gpu"], name
        assert svc["image"].startswith("appliance-cuda:"), name
        (device,) = svc["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"], name
    assert "profiles" not in svcs["worker"]
    assert svcs["gpu-worker"]["command"][-3:] == ["-Q", "ingest", "enrich"]


def test_commands_match_the_code(gpu_config: dict[str, Any]) -> None:
    svcs = services(gpu_config)
    assert svcs["api"]["command"][:2] == ["gunicorn", "appliance.api:create_app()"]
    assert svcs["worker"]["command"][:2] == ["dramatiq", "appliance.workers"]
    for name in ("init", "llm", "llm-gpu"):
        assert svcs[name]["command"][:3] == ["python", "-m", "appliance.packaging.container"], name
    for name in ("api", "worker", "llm"):
        test = svcs[name]["healthcheck"]["test"]
        assert test[1:5] == ["python", "-m", "appliance.packaging.container", "health"], name
    # The health subcommand exists and answers "not serving" at once when its broker does not answer
    # (a port nothing listens on: a worker process of this host, e.g. a test's, must not matter).
    res = subprocess.run(
        [sys.executable, "-m", "appliance.packaging.container", "health", "worker"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=PROJECT_ROOT,
        env={**os.environ, "APPLIANCE_REDIS_PORT": str(free_port())},
    )
    assert res.returncode == 1, res.stderr
    redis = svcs["redis"]
    assert "--appendonly yes" in redis["command"][-1] and "requirepass" in redis["command"][-1]
    assert "REDISCLI_AUTH" in redis["healthcheck"]["test"][1]
    assert svcs["postgres"]["image"].startswith("pgvector/pgvector:")
    assert "shared_preload_libraries=vector,pg_prewarm" in svcs["postgres"]["command"]
    # Sized for the container's memory limit: a quarter of it as shared buffers.
    limit = svcs["postgres"]["deploy"]["resources"]["limits"]["memory"]
    assert "shared_buffers=2GB" in svcs["postgres"]["command"] and int(limit) == 8 * 2**30


@pytest.fixture(scope="module")
def nginx_conf() -> str:
    return (PROJECT_ROOT / "compose" / "nginx.conf").read_text()


def test_proxy_config(gpu_config: dict[str, Any], nginx_conf: str) -> None:
    conf = re.sub(r"#.*", "", nginx_conf)
    size = re.search(r"client_max_body_size\s+(\d+)m;", conf)
    assert size
    nginx_bytes = int(size.group(1)) * 2**20
    api_bytes = int(services(gpu_config)["api"]["environment"]["APPLIANCE_MAX_UPLOAD_BYTES"])
    assert api_bytes <= nginx_bytes <= api_bytes + 16 * 2**20  # the API's 413 is the one clients meet
    for directive in ("proxy_request_buffering off;", "proxy_buffering off;", "http2 on;"):
        assert directive in conf
    assert re.search(r'add_header Strict-Transport-Security "max-age=\d{8,}[^"]*" always;', conf)
    assert re.findall(r"proxy_pass\s+(\S+);", conf) == ["http://api"]
    assert re.findall(r"^\s*server\s+([\w.:-]+)", conf, re.M) == ["api:8470"]
    proxy = services(gpu_config)["proxy"]
    mounted = {ref["source"]: ref.get("target", f"/run/secrets/{ref['source']}") for ref in proxy["secrets"]}
    for directive, secret in (("ssl_certificate", "tls_cert"), ("ssl_certificate_key", "tls_key")):
        path = re.search(rf"{directive}\s+(\S+);", conf)
        assert path and path.group(1) in (f"/run/secrets/{secret}", mounted.get(secret)), directive
    assert "TLSv1.2 TLSv1.3" in conf and "TLSv1 " not in conf
    (nginx_cfg,) = proxy["configs"]
    assert nginx_cfg["target"] == "/etc/nginx/nginx.conf"
    assert gpu_config["configs"]["nginx_conf"]["file"] == str(PROJECT_ROOT / "compose" / "nginx.conf")
    # Every temp path of nginx is in the tmpfs (the proxy's root is read-only).
    for temp in re.findall(r"(\w+_temp_path|pid)\s+(\S+);", conf):
        assert temp[1].startswith("/tmp/"), temp
