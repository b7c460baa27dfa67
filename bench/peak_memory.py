"""Memory of processes (from /proc) and of the GPU (from nvidia-smi), sampled while figures are
measured."""

from __future__ import annotations

import statistics
import subprocess
import threading
from pathlib import Path


def memory_mb(pid: int, *field_names: str) -> tuple[float, ...]:
    """Memory lines of /proc/PID/status, in MB, read at once: resident memory (VmRSS), its
    high-water mark since the process started (VmHWM), the process's own part (RssAnon)..."""
    values: dict[str, float] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, amount = line.partition(":")
        if name in field_names:
            values[name] = int(amount.split()[0]) / 1024  # "123456 kB"
    return tuple(values.get(name, float("nan")) for name in field_names)


class GpuSampler(threading.Thread):
    """GPU memory in use and utilisation while a measurement runs, from nvidia-smi every 0.2 s."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak_memory_mb = 0.0
        self.utilisation: list[float] = []
        self.stop = threading.Event()
        self.start()

    def run(self) -> None:
        query = ["nvidia-smi", "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits", "--id=0"]
        while not self.stop.wait(0.2):
            try:
                utilisation, memory = subprocess.run(query, capture_output=True, text=True, timeout=5).stdout.split(",")
            except (OSError, ValueError, subprocess.TimeoutExpired):
                continue
            self.utilisation.append(float(utilisation))
            self.peak_memory_mb = max(self.peak_memory_mb, float(memory))

    def mean_utilisation(self) -> float:
        return statistics.fmean(self.utilisation) if self.utilisation else float("nan")

    def summary(self) -> dict[str, float]:
        return {"peak_memory_mb": self.peak_memory_mb, "mean_utilisation_percent": self.mean_utilisation()}


class RssSampler(threading.Thread):
    """The highest VmRSS of some processes while a measurement runs (sampled every 0.2 s), and
    the highest part of it that is the process's own memory (RssAnon). The rest is pages mapped
    from files (RssFile), shared with other processes and dropped first under memory pressure:
    the CUDA build's libraries (330-560 MB of a CPU worker) and a memory-mapped checkpoint."""

    def __init__(self, pids: dict[str, int]) -> None:
        super().__init__(daemon=True)
        self.pids = pids
        self.peaks = {name: 0.0 for name in pids}
        self.anonymous_peaks = {name: 0.0 for name in pids}
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.2):
            for name, pid in self.pids.items():
                resident, anonymous = memory_mb(pid, "VmRSS", "RssAnon")
                self.peaks[name] = max(self.peaks[name], resident)
                self.anonymous_peaks[name] = max(self.anonymous_peaks[name], anonymous)
