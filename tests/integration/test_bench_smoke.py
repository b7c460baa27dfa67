"""The benchmark runs end to end at a tiny size, so it cannot rot. No timing is asserted."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO, TESTDATA


def bench_env(tmp_path: Path, redis_url: str, queue: str, **more: str) -> dict[str, str]:
    """The bench's environment: its own data folder (an embedded server), the test Redis, a queue of its own."""
    env = {**os.environ, "IMGEMBED_DATA_DIR": str(tmp_path / "data"), "REDIS_URL": redis_url,
           "IMGEMBED_QUEUE": queue, "IMGEMBED_SWEEP_SECONDS": "0.5", **more}
    env.pop("DATABASE_URL", None)
    return env


def test_bench_smoke(tmp_path: Path, redis_url: str) -> None:
    out = tmp_path / "RESULTS.md"
    # IMGEMBED_PG_SHARED_BUFFERS_MB reaches the embedded server: the results name it.
    env = bench_env(tmp_path, redis_url, "bench-smoke", IMGEMBED_PG_SHARED_BUFFERS_MB="160")
    result = subprocess.run([sys.executable, "-m", "imgembed", "bench", "--smoke", "--model", "imgembed-tiny",
                             "--photos", str(TESTDATA / "photos"), "--out", str(out)],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    text = out.read_text()
    for figure in ("shared_buffers 160MB", "(1) raw model throughput", "(2) end to end", "as file paths",
                   "of the bound", "tensors alone", "(3) one INSERT", "(4) 500 rows",
                   "ef_search=100", "filter matching 1%", "as a reader role", "row-level policy of its own", "(6) peak RSS", "own memory at most",
                   "(8) imgembed-tiny image tower alone", "ONNX Runtime int8", "float32 ceiling", "ONNX Runtime against PyTorch",
                   "7-bit weights cosine",
                   "(PyTorch loaded: False)", "(9) 24 rows as bytea", "repeating 2 distinct images", "```json"):
        assert figure in text, figure


def test_bench_measures_only_the_figures_asked_for(tmp_path: Path, redis_url: str) -> None:
    out = tmp_path / "RESULTS.md"
    env = bench_env(tmp_path, redis_url, "bench-smoke-2")
    command = [sys.executable, "-m", "imgembed", "bench", "--smoke", "--model", "imgembed-tiny", "--out", str(out)]
    refused = subprocess.run([*command, "--figures", "2,7"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0 and "--figures" in refused.stderr
    result = subprocess.run([*command, "--figures", "2,6"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    text = out.read_text()
    assert "(2) end to end" in text and "(6) peak RSS" in text and "generated 500x375 JPEGs" in text
    assert "(1) raw" not in text and "(3) one INSERT" not in text and "ef_search" not in text


def test_bench_writes_the_model_table(tmp_path: Path) -> None:
    out = tmp_path / "models.md"
    result = subprocess.run([sys.executable, "-m", "imgembed", "bench", "--smoke", "--models",
                             "imgembed-tiny,timm:test_resnet", "--out", str(out)],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {line.split("|")[1].strip(): [cell.strip() for cell in line.split("|")[2:-1]]
            for line in out.read_text().splitlines() if line.startswith("| `")}
    assert rows["`imgembed-tiny`"][0] == "64" and rows["`imgembed-tiny`"][-1] == "yes"
    assert rows["`timm:test_resnet`"][:2] == ["96", "160 px"] and rows["`timm:test_resnet`"][-1] == "no"
    refused = subprocess.run([sys.executable, "-m", "imgembed", "bench", "--models", "timm:no_such_net"],
                             cwd=REPO, capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0 and "unknown timm architecture" in refused.stderr


def test_bench_reduce(tmp_path: Path, redis_url: str) -> None:
    """--reduce: the reduced models' table, at a tiny size."""
    out = tmp_path / "RESULTS-reduce.md"
    env = bench_env(tmp_path, redis_url, "bench-smoke-reduce")
    command = [sys.executable, "-m", "imgembed", "bench", "--smoke", "--model", "imgembed-tiny", "--out", str(out)]
    refused = subprocess.run([*command, "--reduce"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "--photos" in refused.stderr
    result = subprocess.run([*command, "--reduce", "8", "--rows", "40", "--photos", str(TESTDATA / "photos")],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    text = out.read_text()
    for line in ("| imgembed-tiny | full | 100% |", "| imgembed-tiny@pca8 | 8 |", "projection per row", "```json"):
        assert line in text, line
