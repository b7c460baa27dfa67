"""Which int8 weights suit this CPU: 8-bit, or 7-bit on x86 CPUs without VNNI.

ONNX Runtime multiplies uint8 activations by int8 weights. Without VNNI, x86 CPUs do it with an
instruction that adds two such products into a signed 16-bit lane, and the sum saturates once it
passes 32,767: the vectors then drift (ONNX Runtime's quantisation guide says so). Weights of 7
bits keep every sum in range (2 x 255 x 63 < 32,767), and integer products are exact, so a CPU
without VNNI gets the very vectors that the 7-bit weights give on a CPU with VNNI, where they are
measured (docs/performance.md). VNNI CPUs and ARM's dot-product instructions add into 32 bits and
take full 8-bit weights, which keep more precision.
"""

from __future__ import annotations

from pathlib import Path

CPU_INFO = Path("/proc/cpuinfo")
VNNI_FLAGS = {"avx512_vnni", "avx_vnni"}
WEIGHT_BITS = (8, 7)  # the int8 weights an export makes


def read_cpu_info() -> str:
    """/proc/cpuinfo's text; empty where there is none (not Linux)."""
    try:
        return CPU_INFO.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def x86_flags(cpu_info: str) -> set[str] | None:
    """The CPU's x86 feature flags from /proc/cpuinfo's text; None for other CPUs (ARM calls its
    features "Features") or when there is nothing to go by."""
    for line in cpu_info.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return set(value.split())
    return None


def int8_weight_bits(cpu_info: str | None = None) -> int:
    """7 on an x86 CPU without VNNI, else 8 (also where nothing tells: most such hosts, Apple's and
    ARM's, do not saturate); ``cpu_info`` is /proc/cpuinfo's text (read if None)."""
    flags = x86_flags(read_cpu_info() if cpu_info is None else cpu_info)
    return 7 if flags is not None and not VNNI_FLAGS & flags else 8
