"""How many torch threads a CPU training should use on a machine shared with other work.

torch starts one intra-op thread per core. When another process keeps one of those cores
busy, every parallel region waits for the thread that shares a core with it: on a 2-core
machine a 2-thread ISIC 2017 run fell from ~27 to 4.7 images/s beside one busy process,
far below the ~16 images/s one thread gets alone. :class:`AdaptiveThreads` watches how
much CPU the rest of the machine uses (all CPU time on the machine minus this process's
own, over the last window of training) and sets torch's thread count to the cores left
free, between 1 and the cores this process may use. Linux only (``/proc/stat``);
elsewhere, or with ``EGEUNET_ADAPTIVE_THREADS=0``, it leaves the thread count alone.

Results on CPU depend on the thread count only through float rounding; a run whose
thread count changed is not bit-identical to one that kept it.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

PROC_STAT = Path("/proc/stat")
CHECK_SECONDS = 10.0
"""Length of the window over which the other processes' CPU use is measured."""


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity where the OS tells it)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def machine_busy_seconds(stat: Path = PROC_STAT) -> float | None:
    """CPU seconds all processes have used since boot (``/proc/stat``), or None."""
    try:
        fields = stat.read_text().split("\n", 1)[0].split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    # user nice system idle iowait irq softirq steal ...: busy = all but idle and iowait.
    values = [int(v) for v in fields[1:]]
    busy = sum(values) - values[3] - (values[4] if len(values) > 4 else 0)
    return busy / os.sysconf("SC_CLK_TCK")


def free_cores(others_busy: float, cores: int) -> int:
    """Cores left to us when other processes keep ``others_busy`` cores' worth busy.

    A core counts as taken once another process uses more than a third of it (a mostly
    idle core still preempts a thread that waits at every barrier).
    """
    taken = int(others_busy + 2 / 3)
    return max(1, min(cores, cores - taken))


class AdaptiveThreads:
    """Sets torch's thread count from the cores other processes leave free.

    Call :meth:`check` often (every training step); every ``CHECK_SECONDS`` it compares
    the machine's CPU time with this process's over the window and, when the free cores
    changed, calls ``torch.set_num_threads``. ``fixed`` sets that many threads once and
    never changes them; ``adapt=False`` (a GPU run) leaves torch's count alone.
    """

    def __init__(
        self, fixed: int | None = None, adapt: bool = True, window: float = CHECK_SECONDS
    ) -> None:
        self.cores = usable_cores()
        self.window = window
        if fixed is not None:
            if not isinstance(fixed, int) or isinstance(fixed, bool) or fixed < 1:
                raise ValueError(f"threads: expected a positive integer, got {fixed!r}")
            torch.set_num_threads(fixed)
        self.enabled = (
            adapt
            and fixed is None
            and self.cores > 1
            and os.environ.get("EGEUNET_ADAPTIVE_THREADS", "1") != "0"
            and machine_busy_seconds() is not None
        )
        self.changes: list[tuple[float, int]] = []  # (others' busy cores, new thread count)
        self._start()

    def _start(self) -> None:
        self._wall = time.monotonic()
        self._own = time.process_time()
        self._machine = machine_busy_seconds() if self.enabled else None

    def check(self) -> int:
        """Adjust the thread count if a window has passed; returns the thread count."""
        if not self.enabled:
            return torch.get_num_threads()
        elapsed = time.monotonic() - self._wall
        if elapsed < self.window:
            return torch.get_num_threads()
        machine = machine_busy_seconds()
        if machine is None or self._machine is None:
            self.enabled = False
            return torch.get_num_threads()
        others = max(0.0, (machine - self._machine) - (time.process_time() - self._own))
        others_busy = others / elapsed
        threads = free_cores(others_busy, self.cores)
        if threads != torch.get_num_threads():
            torch.set_num_threads(threads)
            self.changes.append((round(others_busy, 2), threads))
        self._start()
        return threads
