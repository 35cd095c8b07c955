"""Event-loop lag: how late the loop wakes a task that asked to sleep, i.e. the delay every callback sees.

A task sleeps `interval` seconds again and again and records how much later than asked it woke up, in a
histogram with fixed bucket edges. When a file is given, the histogram is written there (atomically,
about once a second) as JSON, so that a benchmark or an operator can read percentiles over any window
by subtracting two snapshots. Costs one wake-up per interval.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import json
import os
import time
from pathlib import Path

# Upper bucket edges in milliseconds: 0.1 ms steps to 2 ms, then 1 ms to 50 ms, then coarser to 10 s.
BUCKET_EDGES_MS: tuple[float, ...] = (
    *(round(0.1 * i, 1) for i in range(1, 21)),
    *(float(i) for i in range(3, 51)),
    *(float(i) for i in range(60, 201, 10)),
    *(float(i) for i in range(250, 1001, 50)),
    *(float(i) for i in range(1500, 10001, 500)),
)


class LoopLagMonitor:
    def __init__(self, path: Path | None = None, *, interval: float = 0.02, write_every: float = 1.0) -> None:
        self._path = path
        self._interval = interval
        self._write_every = write_every
        self.counts = [0] * (len(BUCKET_EDGES_MS) + 1)  # the last bucket: beyond the last edge
        self.samples = 0
        self.max_ms = 0.0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> LoopLagMonitor:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="loop-lag")
        return self

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._write()

    def record(self, lag_ms: float) -> None:
        self.counts[bisect.bisect_left(BUCKET_EDGES_MS, lag_ms)] += 1
        self.samples += 1
        self.max_ms = max(self.max_ms, lag_ms)

    async def _run(self) -> None:
        written = time.monotonic()
        while True:
            asked = time.monotonic()
            await asyncio.sleep(self._interval)
            woke = time.monotonic()
            self.record(max(0.0, (woke - asked - self._interval) * 1000.0))
            if self._path is not None and woke - written >= self._write_every:
                written = woke
                self._write()

    def snapshot(self) -> dict[str, object]:
        return {
            "pid": os.getpid(),
            "at": time.time(),
            "interval_ms": self._interval * 1000.0,
            "samples": self.samples,
            "max_ms": round(self.max_ms, 3),
            "edges_ms": BUCKET_EDGES_MS,
            "counts": self.counts,
        }

    def _write(self) -> None:
        if self._path is None:
            return
        # Small (a few kB), so written on the loop; replace() keeps a reader from seeing half a file.
        temporary = self._path.with_name(f".{self._path.name}.tmp")
        temporary.write_text(json.dumps(self.snapshot()))
        temporary.replace(self._path)
