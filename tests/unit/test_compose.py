"""docker-compose.yml describes the production-like stack. Docker cannot run here: the file is
checked offline, for what `docker compose config` would refuse and for what the stack promises."""

from __future__ import annotations

import re
import tomllib
from urllib.parse import urlsplit

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


def test_compose_file_holds_together() -> None:
    """What `docker compose config` would refuse, checked without a compose client: every service
    runs an image or a build with a Dockerfile, its dependencies, volumes, networks, profiles and
    ports are well formed and declared, its healthcheck is a command, and every ${VARIABLE} has a
    default (the file works with no .env)."""
    text = (REPO / "docker-compose.yml").read_text()
    compose = yaml.safe_load(text)
    assert set(compose) <= {"name", "services", "volumes", "networks", "configs", "secrets"} | {
        key for key in compose if key.startswith("x-")}
    services, volumes = compose["services"], set(compose.get("volumes") or {})
    networks = set(compose.get("networks") or {}) | {"default"}
    for name, service in services.items():
        assert ("image" in service) != ("build" in service) or "image" in service, name
        if "build" in service:
            context = REPO / (service["build"] if isinstance(service["build"], str) else service["build"]["context"])
            assert (context / "Dockerfile").is_file(), name
        depends = service.get("depends_on", {})
        for other, rule in (depends.items() if isinstance(depends, dict) else ((other, {}) for other in depends)):
            assert other in services and other != name, (name, other)
            assert rule.get("condition", "service_started") in (
                "service_started", "service_healthy", "service_completed_successfully"), (name, rule)
            if rule.get("condition") == "service_healthy":
                assert "healthcheck" in services[other], (name, other)
        for mount in service.get("volumes", []):
            source = mount.split(":")[0] if isinstance(mount, str) else mount["source"]
            if source.startswith((".", "/")):
                assert (REPO / source).exists() or source.startswith("/"), (name, source)
            else:
                assert source in volumes, (name, source)
        assert set(service.get("networks", [])) <= networks, name
        assert isinstance(service.get("profiles", []), list), name
        for port in service.get("ports", []):
            assert isinstance(port, str) and all(part.isdigit() for part in port.split(":")[-2:]), (name, port)
        if "healthcheck" in service:
            assert service["healthcheck"]["test"][0] in ("CMD", "CMD-SHELL"), name
        assert service.get("restart", "no") in ("no", "always", "on-failure", "unless-stopped"), name
        for key, value in (service.get("environment") or {}).items():
            assert isinstance(key, str) and not isinstance(value, (list, dict)), (name, key)
    for variable in re.findall(r"\$\{([^}]*)\}", text):
        assert ":-" in variable or "-" in variable, f"${{{variable}}} has no default"


def test_compose_runs_nothing_as_the_superuser_after_setting_up() -> None:
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    services = compose["services"]
    users = {name: urlsplit(service["environment"]["DATABASE_URL"]).username
             for name, service in services.items() if "DATABASE_URL" in service.get("environment", {})}
    assert users == {"migrate": "imgembed_owner", "dispatcher": "embedder", "worker": "embedder",
                     "worker-gpu": "embedder"}
    assert "DATABASE_URL" not in str(services["flower"]) and "POSTGRES" not in str(services["grafana"])
    assert "./docker/postgres-init.sh:/docker-entrypoint-initdb.d/10-imgembed.sh:ro" in services["postgres"]["volumes"]
    init = (REPO / "docker" / "postgres-init.sh").read_text()
    assert "CREATE ROLE imgembed_owner LOGIN CREATEROLE" in init and "SUPERUSER" not in init
    assert "IN ROLE imgembed_worker" in init and "CREATE EXTENSION vector" in init
    # Redis asks for its password, and every client gives it.
    assert "--requirepass" in " ".join(services["redis"]["command"])
    for name in ("migrate", "dispatcher", "worker", "worker-gpu"):
        redis_url = services[name]["environment"]["REDIS_URL"]
        assert urlsplit(redis_url).password, name


def test_monitoring_profile_scrapes_every_dispatcher_and_worker() -> None:
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    services = compose["services"]
    monitoring = {name for name, service in services.items() if service.get("profiles") == ["monitoring"]}
    assert monitoring == {"prometheus", "grafana", "flower"}
    port = int(compose["x-imgembed"]["environment"]["IMGEMBED_METRICS_PORT"])
    assert services["prometheus"]["volumes"][0] == "./docker/prometheus.yml:/etc/prometheus/prometheus.yml:ro"
    scraped = {}
    for job in yaml.safe_load((REPO / "docker" / "prometheus.yml").read_text())["scrape_configs"]:
        for discovery in job["dns_sd_configs"]:
            assert discovery["port"] == port and discovery["type"] == "A"
            scraped.update({name: job["job_name"] for name in discovery["names"]})
    assert scraped == {"dispatcher": "imgembed-dispatcher", "worker": "imgembed-worker", "worker-gpu": "imgembed-worker"}
    # Grafana: the datasource and the dashboard folder it is provisioned with are the repository's.
    mounts = dict(volume.split(":")[:2] for volume in services["grafana"]["volumes"])
    assert mounts == {"./docker/grafana/provisioning": "/etc/grafana/provisioning",
                      "./docker/grafana/dashboards": "/var/lib/grafana/dashboards"}
    provisioning = REPO / "docker" / "grafana" / "provisioning"
    (source,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "imgembed.yml").read_text())["providers"]
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"
    assert "flower" in services["flower"]["command"] and "IMGEMBED_CELERY_EVENTS" in compose["x-imgembed"]["environment"]


def test_dashboard_panels_use_only_metrics_imgembed_serves() -> None:
    import json
    import re

    from imgembed.metrics import METRIC_NAMES

    dashboard = json.loads((REPO / "docker" / "grafana" / "dashboards" / "imgembed.json").read_text())
    assert dashboard["uid"] == "imgembed" and dashboard["panels"]
    served = {name + suffix for name in METRIC_NAMES for suffix in ("", "_bucket", "_sum", "_count")}
    used = set()
    for panel in dashboard["panels"]:
        assert panel["title"] and panel["targets"], panel
        for target in panel["targets"]:
            names = set(re.findall(r"\bimgembed_[a-z_]+", target["expr"]))
            assert names and names <= served, (panel["title"], names - served)
            assert target["datasource"]["uid"] == "prometheus"
            used |= names
    # Throughput, backlog, failures by reason, batch timings and memory are all on it.
    assert {"imgembed_rows_embedded_total", "imgembed_backlog_jobs", "imgembed_rows_failed_total",
            "imgembed_forward_pass_seconds_bucket", "imgembed_process_resident_bytes"} <= used


def test_celery_task_events_follow_the_setting() -> None:
    from imgembed.celery_app import create_celery_app
    from imgembed.settings import load_settings

    for raw, expected in (("0", False), ("1", True)):
        app = create_celery_app(load_settings({"REDIS_URL": "redis://localhost:1/0", "IMGEMBED_CELERY_EVENTS": raw}))
        assert app.conf.worker_send_task_events is expected and app.conf.task_send_sent_event is expected
