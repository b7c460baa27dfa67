"""Every setting imgembed reads, in one table.

Each setting is a field of :class:`Settings` that names its environment variable, how its text is
read and a line of help. Reading the environment (:func:`load_settings`), the ``environment:`` part
of every command's ``--help`` (:func:`environment_help`) and the environment handed to child
processes (:meth:`Settings.as_environment`) are all derived from that table. Nothing is read at
import time: call :func:`load_settings` where a process starts.
"""

from __future__ import annotations

import ipaddress
import os
import textwrap
from collections.abc import Callable, Mapping
from dataclasses import MISSING, Field, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from imgembed.errors import ImgembedError

DEFAULT_MODEL = "ViT-B-32:laion2b_s34b_b79k"
POSTGRES_SHARED_BUFFERS_MB = 128  # PostgreSQL's own default shared_buffers
EMBEDDED_SERVICES = "unset: `imgembed up`, `demo` and `bench` start their own"


class SettingsError(ImgembedError, ValueError):
    """A setting has a value imgembed cannot use."""


Parser = Callable[[str, str], Any]  # (variable name, its text, never empty) -> the value


# --- parsers: each turns one variable's non-empty text into a value, or says what is wrong ---

def _text(_name: str, raw: str) -> str:
    return raw.strip()


def _integer(minimum: int) -> Parser:
    def parse(name: str, raw: str) -> int:
        try:
            value = int(raw)
        except ValueError:
            raise SettingsError(f"{name}={raw!r} is not an integer") from None
        if value < minimum:
            raise SettingsError(f"{name}={value} must be at least {minimum}")
        return value

    return parse


def _integer_or_auto(name: str, raw: str) -> int | None:
    """An integer of at least 1, or None for "auto"."""
    return None if raw.strip().lower() == "auto" else _integer(1)(name, raw)


def _positive_number(name: str, raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not a number") from None
    if value <= 0:
        raise SettingsError(f"{name}={value} must be positive")
    return value


def _boolean(name: str, raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise SettingsError(f"{name}={raw!r} is not a boolean (use 1/0, true/false)")


def _one_of(*choices: str, upper: bool = False) -> Parser:
    def parse(name: str, raw: str) -> str:
        value = raw.strip().upper() if upper else raw.strip().lower()
        if value not in choices:
            raise SettingsError(f"{name}={value!r}: use {' or '.join(choices)}")
        return value

    return parse


def _device(name: str, raw: str) -> str:
    device = raw.strip()
    if device not in {"auto", "cpu"} and not device.startswith("cuda"):
        raise SettingsError(f"{name}={device!r}: use auto, cpu, cuda or cuda:N")
    return device


def _networks(name: str, raw: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    try:
        return tuple(ipaddress.ip_network(part.strip()) for part in raw.split(",") if part.strip())
    except ValueError as error:
        raise SettingsError(f"{name}={raw!r}: {error} (give networks such as 10.1.2.0/24,192.168.7.5/32)") from None


def _path(_name: str, raw: str) -> Path:
    return Path(raw).expanduser()


def _paths(_name: str, raw: str) -> tuple[Path, ...]:
    return tuple(Path(part).expanduser().resolve() for part in raw.split(os.pathsep) if part.strip())


# --- defaults that depend on the machine ---

def _default_data_dir() -> Path:
    import platformdirs

    return Path(platformdirs.user_data_dir("imgembed"))


def _default_decode_threads() -> int:
    return min(8, (os.cpu_count() or 2) * 2)


def _default_shared_buffers_mb() -> int:
    """A quarter of the machine's memory (PostgreSQL's advice), at most 1 GB: room for the HNSW
    index and vectors of about 250,000 images at 512 dimensions."""
    try:
        memory_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
    except (ValueError, OSError):
        return POSTGRES_SHARED_BUFFERS_MB
    return max(POSTGRES_SHARED_BUFFERS_MB, min(1024, memory_mb // 4))


def _as_text(value: object) -> str:
    """A value as its environment variable writes it (the parsers read it back)."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, tuple):
        separator = "," if value and not isinstance(value[0], Path) else os.pathsep
        return separator.join(str(part) for part in value)
    return str(value)


def _setting(env: str, default: Any, parse: Parser, help: str, *,
             default_help: str | None = None) -> Any:
    """One row of the table. ``default`` may be a function of no arguments, called at load time
    (``default_help`` then says in words what it gives)."""
    metadata = {"env": env, "parse": parse, "help": help,
                "default_help": default_help if default_help is not None else _as_text(default)}
    if callable(default):
        return field(default_factory=default, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class Settings:
    # services
    database_url: str | None = _setting(
        "DATABASE_URL", None, _text, "PostgreSQL with pgvector", default_help=EMBEDDED_SERVICES)
    redis_url: str | None = _setting(
        "REDIS_URL", None, _text, "Redis, the Celery broker", default_help=EMBEDDED_SERVICES)
    # models and devices
    model: str = _setting(
        "IMGEMBED_MODEL", DEFAULT_MODEL, _text,
        "model of new watches: ARCH:TAG, ARCH:/path/checkpoint.pt, imgembed-tiny or imgembed-shapes")
    device: str = _setting("IMGEMBED_DEVICE", "auto", _device, "auto, cpu, cuda or cuda:N")
    batch_size: int = _setting("IMGEMBED_BATCH_SIZE", 32, _integer(1), "jobs per claim (one Celery task)")
    forward_batch: int | None = _setting(
        "IMGEMBED_FORWARD_BATCH", None, _integer_or_auto,
        "most images in one forward pass (auto: the claim size on CPU, measured on CUDA)", default_help="auto")
    jpeg_decode: str = _setting(
        "IMGEMBED_JPEG_DECODE", "pillow", _one_of("pillow", "device"),
        "pillow, or device: decode JPEGs on the model's GPU (nvJPEG)")
    runtime: str = _setting(
        "IMGEMBED_RUNTIME", "auto", _one_of("auto", "torch", "onnx"),
        "what runs the model: onnx (ONNX Runtime on the CPU), torch (PyTorch), or auto: onnx on a CPU where "
        "onnxruntime is installed, torch on CUDA")
    onnx_quantize: str = _setting(
        "IMGEMBED_ONNX_QUANTIZE", "none", _one_of("none", "int8"),
        "ONNX Runtime's weights: none (float32) or int8 (dynamic quantisation: faster, vectors differ a little)")
    # worker processes
    worker_threads: int = _setting("IMGEMBED_WORKER_THREADS", 2, _integer(1), "Celery tasks a worker runs at once")
    decode_threads: int = _setting(
        "IMGEMBED_DECODE_THREADS", _default_decode_threads, _integer(1), "threads reading and decoding images",
        default_help="twice the cores, at most 8")
    malloc_arenas: int = _setting(
        "IMGEMBED_MALLOC_ARENAS", 2, _integer(0), "glibc malloc arenas of a worker (0: glibc's default)")
    openmp_wait_policy: str = _setting(
        "OMP_WAIT_POLICY", "PASSIVE", _one_of("ACTIVE", "PASSIVE", upper=True),
        "how PyTorch's idle threads wait in a worker")
    model_retry_max_seconds: float = _setting(
        "IMGEMBED_MODEL_RETRY_MAX_SECONDS", 60.0, _positive_number,
        "longest wait between tries to load a model that failed to load (its rows wait meanwhile)")
    # the queue
    queue: str = _setting("IMGEMBED_QUEUE", "imgembed", _text, "Celery queue name")
    lease_seconds: float = _setting(
        "IMGEMBED_LEASE_SECONDS", 300.0, _positive_number, "a claim's lease; expired claims are retried")
    max_attempts: int = _setting("IMGEMBED_MAX_ATTEMPTS", 5, _integer(1), "tries before a job fails")
    retry_backoff_seconds: float = _setting(
        "IMGEMBED_RETRY_BACKOFF_SECONDS", 2.0, _positive_number, "wait before a failed job is tried again (doubles each attempt)")
    sweep_seconds: float = _setting(
        "IMGEMBED_SWEEP_SECONDS", 2.0, _positive_number, "dispatcher's sweep when no NOTIFY arrives")
    max_in_flight: int = _setting(
        "IMGEMBED_MAX_IN_FLIGHT", 512, _integer(1), "claims sent to Celery and not yet finished, at most")
    # images
    max_image_bytes: int = _setting("IMGEMBED_MAX_IMAGE_BYTES", 64 * 1024 * 1024, _integer(1), "largest image read")
    max_image_pixels: int = _setting(
        "IMGEMBED_MAX_PIXELS", 50_000_000, _integer(1),
        "largest image decoded, in pixels: a decode holds about 4.5 bytes a pixel, times IMGEMBED_DECODE_THREADS")
    allowed_roots: tuple[Path, ...] = _setting(
        "IMGEMBED_ALLOWED_ROOTS", (), _paths, "folders image paths must lie in, separated by ':'",
        default_help="any")
    allow_http: bool = _setting("IMGEMBED_ALLOW_HTTP", False, _boolean, "fetch http(s) image locations")
    http_allow_private: bool = _setting(
        "IMGEMBED_HTTP_ALLOW_PRIVATE", False, _boolean, "let http(s) reach private and loopback addresses")
    http_allow_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = _setting(
        "IMGEMBED_HTTP_ALLOW_NETWORKS", (), _networks,
        "networks (CIDR, separated by ',') http(s) may reach besides public addresses: an internal image store",
        default_help="none")
    http_timeout_seconds: float = _setting(
        "IMGEMBED_HTTP_TIMEOUT_SECONDS", 15.0, _positive_number,
        "deadline of one http(s) fetch, redirects and reads included")
    # local services and logs
    data_dir: Path = _setting(
        "IMGEMBED_DATA_DIR", _default_data_dir, _path, "where `up`, `demo` and `bench` keep their services' data",
        default_help="the user's data folder")
    model_dir: Path | None = _setting(
        "IMGEMBED_MODEL_DIR", None, _path, "checkpoints kept on this host (imgembed models pull / import): workers "
        "load ARCH:TAG models from it without the network", default_help="IMGEMBED_DATA_DIR/models")
    pg_shared_buffers_mb: int = _setting(
        "IMGEMBED_PG_SHARED_BUFFERS_MB", _default_shared_buffers_mb, _integer(1),
        "shared_buffers of the embedded PostgreSQL", default_help="a quarter of memory, 128-1024")
    # what operators watch
    metrics_port: int = _setting(
        "IMGEMBED_METRICS_PORT", 0, _integer(0), "serve Prometheus metrics of a worker or dispatcher on this port "
        "(0: off; each process on a host needs its own)", default_help="0, off")
    metrics_address: str = _setting("IMGEMBED_METRICS_ADDRESS", "0.0.0.0", _text, "address the metrics port listens on")
    celery_events: bool = _setting(
        "IMGEMBED_CELERY_EVENTS", False, _boolean, "workers send Celery task events (for Flower)")
    log_level: str = _setting("IMGEMBED_LOG_LEVEL", "INFO", _one_of("DEBUG", "INFO", "WARNING", "ERROR", upper=True),
                              "of imgembed's own log lines (the libraries' say only warnings)")

    def __post_init__(self) -> None:
        if self.model_dir is None:  # beside the other data unless set apart
            object.__setattr__(self, "model_dir", self.data_dir / "models")

    @property
    def models_path(self) -> Path:
        """The model directory (IMGEMBED_MODEL_DIR)."""
        return self.model_dir or self.data_dir / "models"

    def with_overrides(self, **changes: object) -> Settings:
        return replace(self, **changes)  # type: ignore[arg-type]

    def as_environment(self) -> dict[str, str]:
        """Every setting as the environment variable that gives it, for child processes."""
        return {setting.metadata["env"]: _as_text(getattr(self, setting.name)) for setting in fields(self)}


def _default(setting: Field[Any]) -> Any:
    return setting.default_factory() if setting.default is MISSING else setting.default  # type: ignore[operator]


def load_settings(env: Mapping[str, str] | None = None) -> Settings:
    """Read settings from ``env`` (default: the process environment). An unset or empty variable
    gives the setting's default; DATABASE_URL and REDIS_URL unset give those of the stack that
    `imgembed up` runs from the same data folder, while it runs."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    for setting in fields(Settings):
        raw = env.get(setting.metadata["env"], "")
        values[setting.name] = setting.metadata["parse"](setting.metadata["env"], raw) if raw.strip() else _default(setting)
    if not values["database_url"] or not values["redis_url"]:
        _use_running_stack(values)
    return Settings(**values)


def _use_running_stack(values: dict[str, Any]) -> None:
    """Services left unset are those of the stack `imgembed up` runs from the same data folder."""
    from imgembed.local.record import running_stack

    running = running_stack(values["data_dir"])
    if running is not None:
        values["database_url"] = values["database_url"] or running[0]
        values["redis_url"] = values["redis_url"] or running[1]


def environment_help() -> str:
    """The ``environment:`` part of ``--help``: every variable, what it sets, its default."""
    rows = [(setting.metadata["env"], setting.metadata["help"], setting.metadata["default_help"])
            for setting in fields(Settings)]
    indent = " " * (max(len(name) for name, _, _ in rows) + 4)
    lines = ["environment (default in brackets):"]
    for name, text, default in rows:
        described = text + (f" [{default}]" if default else "")
        lines.append(textwrap.fill(described, width=100, initial_indent=f"  {name}".ljust(len(indent)),
                                   subsequent_indent=indent))
    return "\n".join(lines) + "\n"


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
