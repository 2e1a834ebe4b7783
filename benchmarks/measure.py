"""Wall time, CPU time and peak memory of a section of code, for the benchmarks' tables."""

from __future__ import annotations

import contextlib
import pathlib
import resource
import time
from collections.abc import Iterator
from dataclasses import dataclass

MIB = 1024.0  # /proc reports KiB


def _proc_status_kib(key: str) -> int:
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def _cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


@dataclass
class Section:
    """Wall time and memory of the code inside ``measured()``: peak RSS over the section (the kernel's
    high-water mark, reset on entry through /proc/self/clear_refs) and RSS on entry, so that memory
    held before the section (imports, the torch model to prune) can be told apart. CPU time (all
    threads, user + system) is kept too: unlike wall time it hardly moves when other processes compete
    for the cores, unless a thread pool busy-waits for a descheduled worker."""

    seconds: float = 0.0
    cpu_seconds: float = 0.0
    rss_start_mib: float = 0.0
    rss_peak_mib: float = 0.0


@contextlib.contextmanager
def measured() -> Iterator[Section]:
    sec = Section()
    # reset VmHWM to the current RSS; where that is refused the peak covers the child's whole life
    with contextlib.suppress(OSError):
        pathlib.Path("/proc/self/clear_refs").write_text("5")
    sec.rss_start_mib = _proc_status_kib("VmRSS") / MIB
    cpu0, t0 = _cpu_seconds(), time.perf_counter()
    yield sec
    sec.seconds = time.perf_counter() - t0
    sec.cpu_seconds = _cpu_seconds() - cpu0
    sec.rss_peak_mib = _proc_status_kib("VmHWM") / MIB
