"""docker-compose.yml describes the production-like stack. Docker cannot run here: the file is
checked structurally, and with `docker compose config` where the client has compose."""

from __future__ import annotations

import shutil
import subprocess

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
    assert (REPO / "Dockerfile").exists()


def test_docker_compose_config() -> None:
    docker = shutil.which("docker")
    if docker is None or subprocess.run([docker, "compose", "version"], capture_output=True).returncode != 0:
        pytest.skip("no docker compose client on this machine")
    result = subprocess.run([docker, "compose", "config", "--quiet"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
