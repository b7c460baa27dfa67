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

# Held-out kNN accuracy (k=5, 3 shapes, 200 held out) gained at least this much. With these settings
# (20 epochs, 200 images to train on, a tiny ViT from random weights) it gained +0.02 on this test's
# split and +0.055, +0.055, +0.09 and +0.08 on four other sets of generated shapes: small, but always
# a gain. Training and the split are deterministic (seeded, views drawn in order).
MARGIN = 0.01


def test_simclr_tuning_improves_knn_labels(db: psycopg.Connection, services: Services, tmp_path: Path) -> None:
    db.execute("CREATE TABLE drawings (id bigint PRIMARY KEY, picture bytea, kind text)")
    with db.cursor() as cursor:
        cursor.executemany("INSERT INTO drawings VALUES (%s, %s, %s)",
                           [(i, shape.png_bytes(), shape.shape) for i, shape in enumerate(random_shapes(400, seed=3))])
    db.execute("INSERT INTO drawings VALUES (400, 'not an image', 'circle')")  # left out, and said
    out = tmp_path / "ssl.pt"
    result = subprocess.run(
        [sys.executable, "-m", "imgembed", "finetune", "--self-supervised", "--table", "drawings",
         "--image-column", "picture", "--label-column", "kind", "--model", "imgembed-shapes", "--from-scratch",
         "--epochs", "20", "--batch-size", "64", "--lr", "2e-3", "--holdout", "0.5", "--out", str(out), "--register"],
        cwd=REPO, env=services.env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "400 images (1 unreadable" in result.stdout
    before, after = map(float, re.search(r"kNN label accuracy \(k=5\): ([\d.]+) -> ([\d.]+)", result.stdout).groups())
    assert after >= before + MARGIN, result.stdout
    assert out.is_file()
    assert db.execute("SELECT count(*) FROM imgembed.model WHERE name = %s",
                      (f"imgembed-shapes:{out.resolve()}",)).fetchone()[0] == 1

    refused = subprocess.run([sys.executable, "-m", "imgembed", "finetune", "--self-supervised", "--csv", "x.csv"],
                             cwd=REPO, env=services.env(), capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0 and "images alone" in refused.stderr
