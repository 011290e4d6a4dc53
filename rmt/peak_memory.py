"""Peak memory of a block of code: CUDA's allocator statistics on a GPU, the kernel's
resident-set high-water mark (Linux) on the CPU."""

from __future__ import annotations

from pathlib import Path

import psutil
import torch

# Set in the environment of a measuring process, glibc gives freed blocks back at once, so
# the resident set follows live tensors instead of keeping the process's past peak.
EXACT_CPU_MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}
_STATUS = Path("/proc/self/status")


def _status_mb(field: str) -> float:
    for line in _STATUS.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} missing from {_STATUS}")


class PeakMemory:
    """`with PeakMemory(device) as meter: ...` then `meter.peak_mb`: the peak during the block
    above the baseline taken when the meter was made (make it before building the model to
    count weights too, as CUDA's max_memory_allocated does), `meter.growth_mb`: the peak
    above what was resident when the block started, and `meter.absolute_mb`: the peak itself
    (the process's resident set, or every CUDA tensor), what a machine must have."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.cuda = torch.device(device).type == "cuda"
        self.baseline_mb = self._current_mb()

    def _current_mb(self) -> float:
        if self.cuda:
            return torch.cuda.memory_allocated() / 2**20
        return psutil.Process().memory_info().rss / 2**20

    def __enter__(self) -> "PeakMemory":
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        elif _STATUS.exists():
            Path("/proc/self/clear_refs").write_text("5")  # the high-water mark restarts from now
        self.start_mb = self._current_mb()
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            peak = torch.cuda.max_memory_allocated() / 2**20
        elif _STATUS.exists():
            peak = _status_mb("VmHWM")
        else:  # no high-water mark outside Linux: the end of the block is the best we know
            peak = max(self._current_mb(), self.start_mb)
        self.absolute_mb = peak
        self.peak_mb = peak - self.baseline_mb
        self.growth_mb = peak - self.start_mb
