"""Every setting imgembed reads, in one place.

Settings come from the environment (``IMGEMBED_*``, ``DATABASE_URL``, ``REDIS_URL``). Nothing is
read at import time: call :func:`load_settings` where a process starts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Mapping

DEFAULT_MODEL = "ViT-B-32:laion2b_s34b_b79k"
POSTGRES_SHARED_BUFFERS_MB = 128  # PostgreSQL's own default shared_buffers


class SettingsError(ValueError):
    """A setting has a value imgembed cannot use."""


@dataclass(frozen=True)
class Settings:
    database_url: str | None = None
    redis_url: str | None = None
    model: str = DEFAULT_MODEL
    device: str = "auto"
    batch_size: int = 32
    forward_batch: int | None = None  # None: the claim size on CPU, measured on CUDA (see batcher)
    malloc_arenas: int = 2
    openmp_wait_policy: str = "PASSIVE"  # OMP_WAIT_POLICY of worker processes (see worker.openmp)
    jpeg_decode: str = "pillow"  # or "device": nvJPEG on the model's GPU (see worker.device_decode)
    decode_threads: int = 4
    worker_threads: int = 2
    queue: str = "imgembed"
    lease_seconds: float = 300.0
    max_attempts: int = 5
    retry_backoff_seconds: float = 2.0
    sweep_seconds: float = 2.0
    max_in_flight: int = 512
    max_image_bytes: int = 64 * 1024 * 1024
    max_image_pixels: int = 100_000_000
    allowed_roots: tuple[Path, ...] = ()
    allow_http: bool = False
    http_allow_private: bool = False
    http_timeout_seconds: float = 15.0
    data_dir: Path = field(default_factory=lambda: _default_data_dir())
    # shared_buffers of the embedded PostgreSQL that `up`, `demo` and `bench` start
    pg_shared_buffers_mb: int = POSTGRES_SHARED_BUFFERS_MB
    log_level: str = "INFO"

    def with_overrides(self, **changes: object) -> "Settings":
        return replace(self, **changes)  # type: ignore[arg-type]


def _default_data_dir() -> Path:
    import platformdirs

    return Path(platformdirs.user_data_dir("imgembed"))


def _int(env: Mapping[str, str], name: str, default: int, minimum: int = 1) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not an integer") from None
    if value < minimum:
        raise SettingsError(f"{name}={value} must be at least {minimum}")
    return value


def _default_shared_buffers_mb() -> int:
    """A quarter of the machine's memory (PostgreSQL's advice), at most 1 GB: room for the HNSW
    index and vectors of about 250,000 images at 512 dimensions."""
    try:
        memory_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
    except (ValueError, OSError):
        return POSTGRES_SHARED_BUFFERS_MB
    return max(POSTGRES_SHARED_BUFFERS_MB, min(1024, memory_mb // 4))


def _optional_int(env: Mapping[str, str], name: str) -> int | None:
    """An integer of at least 1, or None for "auto" (also when unset)."""
    if env.get(name, "").strip().lower() in {"", "auto"}:
        return None
    return _int(env, name, 1)


def _float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not a number") from None
    if value <= 0:
        raise SettingsError(f"{name}={value} must be positive")
    return value


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    lowered = raw.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise SettingsError(f"{name}={raw!r} is not a boolean (use 1/0, true/false)")


def load_settings(env: Mapping[str, str] | None = None) -> Settings:
    """Read settings from ``env`` (default: the process environment)."""
    env = os.environ if env is None else env
    roots = tuple(
        Path(part).expanduser().resolve()
        for part in env.get("IMGEMBED_ALLOWED_ROOTS", "").split(os.pathsep)
        if part.strip()
    )
    device = env.get("IMGEMBED_DEVICE", "auto").strip() or "auto"
    if device not in {"auto", "cpu"} and not device.startswith("cuda"):
        raise SettingsError(f"IMGEMBED_DEVICE={device!r}: use auto, cpu, cuda or cuda:N")
    jpeg_decode = env.get("IMGEMBED_JPEG_DECODE", "").strip().lower() or "pillow"
    if jpeg_decode not in {"pillow", "device"}:
        raise SettingsError(f"IMGEMBED_JPEG_DECODE={jpeg_decode!r}: use pillow or device")
    openmp_wait_policy = env.get("OMP_WAIT_POLICY", "").strip().upper() or "PASSIVE"
    if openmp_wait_policy not in {"ACTIVE", "PASSIVE"}:
        raise SettingsError(f"OMP_WAIT_POLICY={openmp_wait_policy!r}: use ACTIVE or PASSIVE")
    data_dir_raw = env.get("IMGEMBED_DATA_DIR")
    return Settings(
        database_url=env.get("DATABASE_URL") or None,
        redis_url=env.get("REDIS_URL") or None,
        model=env.get("IMGEMBED_MODEL", "").strip() or DEFAULT_MODEL,
        device=device,
        batch_size=_int(env, "IMGEMBED_BATCH_SIZE", 32),
        forward_batch=_optional_int(env, "IMGEMBED_FORWARD_BATCH"),
        malloc_arenas=_int(env, "IMGEMBED_MALLOC_ARENAS", 2, minimum=0),
        openmp_wait_policy=openmp_wait_policy,
        jpeg_decode=jpeg_decode,
        decode_threads=_int(env, "IMGEMBED_DECODE_THREADS", min(8, (os.cpu_count() or 2) * 2)),
        worker_threads=_int(env, "IMGEMBED_WORKER_THREADS", 2),
        queue=env.get("IMGEMBED_QUEUE", "").strip() or "imgembed",
        lease_seconds=_float(env, "IMGEMBED_LEASE_SECONDS", 300.0),
        max_attempts=_int(env, "IMGEMBED_MAX_ATTEMPTS", 5),
        retry_backoff_seconds=_float(env, "IMGEMBED_RETRY_BACKOFF_SECONDS", 2.0),
        sweep_seconds=_float(env, "IMGEMBED_SWEEP_SECONDS", 2.0),
        max_in_flight=_int(env, "IMGEMBED_MAX_IN_FLIGHT", 512),
        max_image_bytes=_int(env, "IMGEMBED_MAX_IMAGE_BYTES", 64 * 1024 * 1024),
        max_image_pixels=_int(env, "IMGEMBED_MAX_PIXELS", 100_000_000),
        allowed_roots=roots,
        allow_http=_bool(env, "IMGEMBED_ALLOW_HTTP", False),
        http_allow_private=_bool(env, "IMGEMBED_HTTP_ALLOW_PRIVATE", False),
        http_timeout_seconds=_float(env, "IMGEMBED_HTTP_TIMEOUT_SECONDS", 15.0),
        data_dir=Path(data_dir_raw).expanduser() if data_dir_raw else _default_data_dir(),
        pg_shared_buffers_mb=(_optional_int(env, "IMGEMBED_PG_SHARED_BUFFERS_MB")
                              or _default_shared_buffers_mb()),
        log_level=env.get("IMGEMBED_LOG_LEVEL", "INFO").upper(),
    )


def require_database_url(settings: Settings) -> str:
    if not settings.database_url:
        raise SettingsError(
            "DATABASE_URL is not set: point it at PostgreSQL with pgvector "
            "(or run `imgembed up`, which starts an embedded one and prints the URL)"
        )
    return settings.database_url


def require_redis_url(settings: Settings) -> str:
    if not settings.redis_url:
        raise SettingsError(
            "REDIS_URL is not set: point it at Redis (or run `imgembed up`, which starts one)"
        )
    return settings.redis_url
