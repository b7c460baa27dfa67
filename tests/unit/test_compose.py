"""docker-compose.yml describes the production-like stack. Docker cannot run here: the file is
checked structurally, and with `docker compose config` where the client has compose."""

from __future__ import annotations

import shutil
import subprocess
import tomllib
from urllib.parse import urlsplit

import pytest
import yaml

from tests.conftest import REPO


def test_compose_file_describes_the_stack() -> None:
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"postgres", "redis", "migrate", "dispatcher", "worker", "worker-gpu"} <= set(services)
    assert services["postgres"]["image"].startswith("pgvector/pgvector")
    assert "shared_buffers=1GB" in services["postgres"]["command"] and services["postgres"]["shm_size"] == "2gb"
    for name in ("postgres", "redis"):
        assert "healthcheck" in services[name] and services[name]["restart"] == "unless-stopped"
    assert services["migrate"]["command"] == ["migrate"] and services["migrate"]["restart"] == "no"
    for name in ("dispatcher", "worker", "worker-gpu"):
        assert services[name]["build"] == "." and services[name]["restart"] == "unless-stopped"
        assert services[name]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    gpu = services["worker-gpu"]
    assert gpu["profiles"] == ["gpu"]
    assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert {"pgdata", "redisdata", "models"} <= set(compose["volumes"])


def test_dockerfile_installs_the_built_wheel() -> None:
    dockerfile = (REPO / "Dockerfile").read_text()
    stages = [line for line in dockerfile.splitlines() if line.startswith("FROM ")]
    assert len(stages) == 2 and stages[0].endswith(" AS build")
    assert "pip wheel" in dockerfile and "COPY --from=build /wheels" in dockerfile
    assert "-e ." not in dockerfile and "pip install -e" not in dockerfile
    # Every folder the package is built from (pyproject.toml's package-dir) is copied into the build stage.
    package_dirs = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"].values())
    assert {folder for folder in package_dirs if f"COPY {folder} ./{folder}" in dockerfile} == package_dirs


def test_docker_compose_config() -> None:
    docker = shutil.which("docker")
    if docker is None or subprocess.run([docker, "compose", "version"], capture_output=True).returncode != 0:
        pytest.skip("no docker compose client on this machine")
    result = subprocess.run([docker, "compose", "config", "--quiet"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_compose_runs_nothing_as_the_superuser_after_setting_up() -> None:
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    services = compose["services"]
    users = {name: urlsplit(service["environment"]["DATABASE_URL"]).username
             for name, service in services.items() if "DATABASE_URL" in service.get("environment", {})}
    assert users == {"migrate": "imgembed_owner", "dispatcher": "embedder", "worker": "embedder",
                     "worker-gpu": "embedder"}
    assert "./docker/postgres-init.sh:/docker-entrypoint-initdb.d/10-imgembed.sh:ro" in services["postgres"]["volumes"]
    init = (REPO / "docker" / "postgres-init.sh").read_text()
    assert "CREATE ROLE imgembed_owner LOGIN CREATEROLE" in init and "SUPERUSER" not in init
    assert "IN ROLE imgembed_worker" in init and "CREATE EXTENSION vector" in init
    # Redis asks for its password, and every client gives it.
    assert "--requirepass" in " ".join(services["redis"]["command"])
    for name in ("migrate", "dispatcher", "worker", "worker-gpu"):
        redis_url = services[name]["environment"]["REDIS_URL"]
        assert urlsplit(redis_url).password, name
