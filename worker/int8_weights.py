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


def int8_weight_bits(cpu_info: str | None = None) -> int:
    """7 on an x86 CPU without VNNI, else 8; ``cpu_info`` is /proc/cpuinfo's text (read if None)."""
    if cpu_info is None:
        try:
            cpu_info = CPU_INFO.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return 8  # not Linux: nothing to go by, and most such hosts (Apple, Windows on ARM) do not saturate
    for line in cpu_info.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":  # x86 names its features "flags"; ARM calls them "Features"
            return 8 if VNNI_FLAGS & set(value.split()) else 7
    return 8
