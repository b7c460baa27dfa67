"""Prometheus metrics of a real dispatcher and a real worker, scraped over HTTP while rows go
through, and the backlog query autoscalers read."""

from __future__ import annotations

import socket
import urllib.request

import psycopg
from prometheus_client.parser import text_string_to_metric_families

from imgembed.metrics import METRIC_NAMES
from imgembed.training.synthetic import random_shapes
from tests.conftest import Services, wait_for

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def scrape(port: int) -> Samples:
    """Every sample on a /metrics page, by (name, sorted labels)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:  # noqa: S310
        text = response.read().decode()
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def _scrapable(port: int) -> bool:
    try:
        scrape(port)
    except OSError:
        return False
    return True


def test_counters_and_backlog_move_as_rows_go_through(db: psycopg.Connection, services: Services) -> None:
    db.execute("CREATE TABLE things (id bigint PRIMARY KEY, image bytea)")
    db.execute("SELECT imgembed.watch('things', 'image')")
    with db.cursor() as cursor:
        cursor.executemany("INSERT INTO things VALUES (%s, %s)",
                           [(i, shape.png_bytes()) for i, shape in enumerate(random_shapes(6, seed=41))])
    db.execute("INSERT INTO things VALUES (6, 'not an image at all')")
    backlog = db.execute("SELECT model, sum(queued + in_flight) FROM imgembed.backlog() WHERE table_name = "
                         "'public.things' GROUP BY model").fetchall()
    assert backlog == [("imgembed-tiny", 7)]  # the scaling signal: rows waiting per model

    # A dispatcher alone, two jobs a claim and one claim in flight at most: 5 rows queued, 2 in flight.
    dispatcher_port, worker_port = _free_port(), _free_port()
    services.extra_env.update(IMGEMBED_METRICS_PORT=str(dispatcher_port), IMGEMBED_BATCH_SIZE="2",
                              IMGEMBED_MAX_IN_FLIGHT="1")
    services.start("dispatch")
    wait_for(lambda: _scrapable(dispatcher_port) and value(scrape(dispatcher_port), "imgembed_in_flight_jobs",
                                                           table="public.things", model="imgembed-tiny") == 2,
             60, "the dispatcher's backlog gauges")
    samples = scrape(dispatcher_port)
    labels = {"table": "public.things", "model": "imgembed-tiny"}
    assert value(samples, "imgembed_backlog_jobs", **labels) == 5
    assert value(samples, "imgembed_oldest_queued_seconds", **labels) > 0
    assert value(samples, "imgembed_claims_dispatched_total", model="imgembed-tiny") == 1

    services.extra_env["IMGEMBED_METRICS_PORT"] = str(worker_port)
    services.start("worker")
    wait_for(lambda: db.execute("SELECT pending + in_flight = 0 AND embedded = 6 AND failed = 1 FROM imgembed.status "
                                "WHERE table_name = 'public.things'").fetchone()[0], 120, "the rows through")
    wait_for(lambda: value(scrape(dispatcher_port), "imgembed_backlog_jobs", **labels) == 0
             and value(scrape(dispatcher_port), "imgembed_in_flight_jobs", **labels) == 0, 30, "the backlog at 0")
    assert value(scrape(dispatcher_port), "imgembed_claims_dispatched_total", model="imgembed-tiny") == 4
    assert value(scrape(dispatcher_port), "imgembed_leases_recovered_total") == 0

    worker = scrape(worker_port)
    assert value(worker, "imgembed_rows_embedded_total", **labels) == 6
    assert value(worker, "imgembed_rows_failed_total", reason="not an image", **labels) == 1
    assert value(worker, "imgembed_claims_total", model="imgembed-tiny") == 4
    assert value(worker, "imgembed_model_loaded", model="imgembed-tiny", tower="image") == 1
    assert value(worker, "imgembed_model_load_seconds", model="imgembed-tiny", tower="image") > 0
    assert value(worker, "imgembed_forward_pass_images_sum", model="imgembed-tiny", tower="image") == 6
    assert value(worker, "imgembed_forward_pass_seconds_count", model="imgembed-tiny", tower="image") >= 3
    assert value(worker, "imgembed_read_decode_seconds_count", model="imgembed-tiny") == 4
    assert value(worker, "imgembed_write_seconds_count", model="imgembed-tiny") == 4
    assert value(worker, "imgembed_process_resident_bytes") > 50e6

    # The same bytes again, in another row: no forward pass, one row reused.
    db.execute("INSERT INTO things SELECT 7, image FROM things WHERE id = 0")
    wait_for(lambda: value(scrape(worker_port), "imgembed_rows_reused_total", model="imgembed-tiny") == 1, 60,
             "a reused vector counted")
    assert value(scrape(worker_port), "imgembed_forward_pass_images_sum", model="imgembed-tiny", tower="image") == 6

    # Every metric the package names is served by one of the two (GPU gauges only on CUDA).
    served = {name for name, _ in {**scrape(dispatcher_port), **scrape(worker_port)}}
    expected = {name for name in METRIC_NAMES if not name.startswith("imgembed_gpu_")}
    assert expected <= {name.removesuffix("_count").removesuffix("_sum").removesuffix("_bucket") for name in served}


def test_a_port_in_use_is_said_clearly(services: Services) -> None:
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        services.extra_env["IMGEMBED_METRICS_PORT"] = str(taken.getsockname()[1])
        process = services.start("dispatch")
        assert process.wait(timeout=60) != 0
    assert "give each worker and dispatcher on a host its own port" in process.log_path.read_text()  # type: ignore[attr-defined]
