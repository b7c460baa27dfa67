"""Which int8 weights a CPU runs (imgembed.worker.onnx.int8_weights)."""

from __future__ import annotations

from pathlib import Path

from imgembed.worker.onnx.int8_weights import int8_weight_bits

X86 = "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse2 avx avx2 fma {extra}\nbogomips\t: 4890\n"
ARM = "processor\t: 0\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics asimddp\n"


def test_x86_without_vnni_gets_7_bit_weights() -> None:
    assert int8_weight_bits(X86.format(extra="avx512f avx512bw")) == 7
    assert int8_weight_bits(X86.format(extra="")) == 7


def test_x86_with_vnni_and_other_cpus_get_8_bit_weights() -> None:
    assert int8_weight_bits(X86.format(extra="avx512f avx512_vnni")) == 8
    assert int8_weight_bits(X86.format(extra="avx_vnni")) == 8  # Alder Lake and later, without AVX-512
    assert int8_weight_bits(ARM) == 8
    assert int8_weight_bits("") == 8


def test_this_machine_reads_its_own_cpu() -> None:
    """The bits for this machine, from its own /proc/cpuinfo read here independently."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    flags = next((set(line.split(":", 1)[1].split()) for line in text.splitlines()
                  if line.split(":", 1)[0].strip() == "flags"), None)
    expected = 7 if flags is not None and not {"avx512_vnni", "avx_vnni"} & flags else 8
    assert int8_weight_bits() == expected
