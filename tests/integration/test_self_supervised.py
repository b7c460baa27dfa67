"""Self-supervised tuning without captions: `imgembed finetune --self-supervised` on a table of
generated shapes, from a randomly initialised small model. The shape labels only measure."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import psycopg

from imgembed.training.synthetic import random_shapes
from tests.conftest import REPO, Services

# What the test checks is that tuning works, not how much it helps: at this size (a tiny ViT from
# random weights, 120 images) SimCLR lowers its own loss on every seed, while the held-out kNN
# accuracy it prints moved by -0.045, -0.005, +0.02 and +0.06 on four sets of generated shapes
# (seeds 7, 5, 3, 11; 20 epochs, 200 images): a gain there is a benchmark's question, not a test's.


def test_simclr_tuning_trains_measures_and_registers(db: psycopg.Connection, services: Services, tmp_path: Path) -> None:
    db.execute("CREATE TABLE drawings (id bigint PRIMARY KEY, picture bytea, kind text)")
    with db.cursor() as cursor:
        cursor.executemany("INSERT INTO drawings VALUES (%s, %s, %s)",
                           [(i, shape.png_bytes(), shape.shape) for i, shape in enumerate(random_shapes(240, seed=3))])
    db.execute("INSERT INTO drawings VALUES (240, 'not an image', 'circle')")  # left out, and said
    out = tmp_path / "ssl.pt"
    result = subprocess.run(
        [sys.executable, "-m", "imgembed", "finetune", "--self-supervised", "--table", "drawings",
         "--image-column", "picture", "--label-column", "kind", "--model", "imgembed-shapes", "--from-scratch",
         "--epochs", "6", "--batch-size", "40", "--lr", "2e-3", "--holdout", "0.5", "--out", str(out), "--register"],
        cwd=REPO, env=services.env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "240 images (1 unreadable" in result.stdout
    first, last = map(float, re.search(r"loss \(mean of an epoch\): first ([\d.]+) -> last ([\d.]+)", result.stdout).groups())
    assert last < first, result.stdout  # it learnt its own task
    before, after = map(float, re.search(r"kNN label accuracy \(k=5\): ([\d.]+) -> ([\d.]+)", result.stdout).groups())
    assert 0 <= before <= 1 and 0 <= after <= 1, result.stdout  # measured on the held-out half, with its labels
    assert out.is_file()
    assert db.execute("SELECT count(*) FROM imgembed.model WHERE name = %s",
                      (f"imgembed-shapes:{out.resolve()}",)).fetchone()[0] == 1

    refused = subprocess.run([sys.executable, "-m", "imgembed", "finetune", "--self-supervised", "--csv", "x.csv"],
                             cwd=REPO, env=services.env(), capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0 and "images alone" in refused.stderr
