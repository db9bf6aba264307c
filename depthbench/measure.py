"""Wall time and peak memory per pipeline stage.

Peak host memory is the process's peak RSS during the stage: Linux lets a process reset its own
high-water mark (``/proc/self/clear_refs``), so each stage gets its own peak, not the lifetime one.
"""

from __future__ import annotations

import resource
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _reset_peak_rss() -> bool:
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """Peak resident set size since the last reset (or process start), in bytes."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def synchronize(device: torch.device | str) -> None:
    """Wait for the work queued on ``device`` (a GPU runs asynchronously: a clock read before this times the
    launch, not the work)."""
    device = torch.device(device)
    sync = getattr(getattr(torch, device.type, None), "synchronize", None)
    if device.type != "cpu" and sync is not None:
        sync()


def device_clock(device: torch.device | str) -> float:
    """`time.perf_counter` once the work queued on ``device`` has finished: differences of two readings time the
    work between them."""
    synchronize(device)
    return time.perf_counter()


@dataclass
class StageMeasurement:
    seconds: float
    peak_rss_bytes: int
    peak_gpu_bytes: int | None = None

    def to_dict(self) -> dict:
        return {"seconds": round(self.seconds, 4), "peak_rss_bytes": self.peak_rss_bytes,
                "peak_gpu_bytes": self.peak_gpu_bytes}


@dataclass
class StageTimer:
    stages: dict[str, StageMeasurement] = field(default_factory=dict)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        _reset_peak_rss()
        gpu = torch.cuda.is_available()
        if gpu:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        try:
            yield
        finally:
            if gpu:
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
            previous = self.stages.get(name)
            measurement = StageMeasurement(seconds, peak_rss_bytes(),
                                           torch.cuda.max_memory_allocated() if gpu else None)
            if previous is not None:  # a stage entered twice accumulates time and keeps the larger peak
                measurement = StageMeasurement(
                    previous.seconds + measurement.seconds,
                    max(previous.peak_rss_bytes, measurement.peak_rss_bytes),
                    None if not gpu else max(previous.peak_gpu_bytes or 0, measurement.peak_gpu_bytes or 0),
                )
            self.stages[name] = measurement

    def add(self, stages: dict[str, dict], prefix: str = "") -> None:
        """Append stages measured elsewhere (``to_dict`` form), in order."""
        for name, s in stages.items():
            self.stages[prefix + name] = StageMeasurement(s["seconds"], s["peak_rss_bytes"], s.get("peak_gpu_bytes"))

    def to_dict(self) -> dict:
        return {name: m.to_dict() for name, m in self.stages.items()}
