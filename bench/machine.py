"""The machine, the database and the settings a benchmark run measures on."""

from __future__ import annotations

import os
import platform
import subprocess
from importlib.metadata import PackageNotFoundError, version

import psycopg
import torch

from imgembed.settings import Settings
from imgembed.worker.onnx.int8_weights import VNNI_FLAGS, read_cpu_info, x86_flags


def _vector_instructions(cpu_info: str) -> str:
    """The widest vector instructions the CPU has, and whether it has VNNI (int8 speed and agreement
    depend on it: imgembed.worker.onnx.int8_weights)."""
    flags = x86_flags(cpu_info)
    if not flags:
        return ""
    widest = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    return f" ({widest}, {'with' if flags & VNNI_FLAGS else 'without'} VNNI)"


def machine_description() -> list[str]:
    cpu_info = read_cpu_info()
    cpu = next((line.split(":", 1)[1].strip() for line in cpu_info.splitlines() if line.startswith("model name")),
               platform.processor() or platform.machine())
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    import open_clip

    return [
        f"- machine: {cpu}{_vector_instructions(cpu_info)}, {os.cpu_count()} cores, GPU: {gpu}",
        f"- python {platform.python_version()}, torch {torch.__version__}, open_clip {open_clip.__version__}, "
        f"pgvector-python {version('pgvector')}{_onnxruntime_version()}",
    ]


def _onnxruntime_version() -> str:
    try:
        return f", onnxruntime {version('onnxruntime')}"
    except PackageNotFoundError:
        return ""


def database_description(connection: psycopg.Connection) -> dict[str, str]:
    """The server's versions, and its buffer cache: search latency depends on whether the index fits."""
    row = connection.execute("SELECT current_setting('server_version'), "
                             "(SELECT extversion FROM pg_extension WHERE extname = 'vector'), "
                             "current_setting('shared_buffers')").fetchone()
    assert row is not None
    return dict(zip(("postgres", "pgvector", "shared_buffers"), row))


def device_settings(settings: Settings, device: str) -> Settings:
    """On a GPU the model outruns one decode thread per core only with large claims, several of
    them waiting to merge, and a deep enough queue (see README, Speed)."""
    if not device.startswith("cuda"):
        return settings.with_overrides(device=device)
    return settings.with_overrides(device=device, batch_size=max(settings.batch_size, 256),
                                   worker_threads=max(settings.worker_threads, 4),
                                   decode_threads=max(settings.decode_threads, os.cpu_count() or 1),
                                   max_in_flight=max(settings.max_in_flight, 4096))


def git_revision() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
