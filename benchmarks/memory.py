"""Memory of a process tree, sampled in a thread: what the benchmarks report as peaks."""

from __future__ import annotations

import contextlib
import os
import threading
import time

import psutil


class MemorySampler(threading.Thread):
    """Peaks, every ``interval`` seconds, of a process's own RSS (``rss``), of the summed PSS
    of its descendants (``descendants_pss``: its Ray, shared object-store pages counted once)
    and of the summed PSS of the process and its descendants (``total_pss``). ``pid``: this
    process by default. Use as a context manager, or ``start()`` and ``stop()``."""

    def __init__(self, pid: int | None = None, interval: float = 0.25) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval = pid or os.getpid(), interval
        self.rss = self.descendants_pss = self.total_pss = 0
        self._halt = threading.Event()

    def sample(self, root: psutil.Process) -> None:
        own = descendants = 0
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            self.rss = max(self.rss, root.memory_info().rss)
            own = root.memory_full_info().pss
        for child in root.children(recursive=True):
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                descendants += child.memory_full_info().pss
        self.descendants_pss = max(self.descendants_pss, descendants)
        self.total_pss = max(self.total_pss, own + descendants)

    def run(self) -> None:
        with contextlib.suppress(psutil.NoSuchProcess):
            root = psutil.Process(self.pid)
            while not self._halt.is_set():
                self.sample(root)
                time.sleep(self.interval)

    def stop(self) -> MemorySampler:
        self._halt.set()
        self.join()
        return self

    def __enter__(self) -> MemorySampler:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
