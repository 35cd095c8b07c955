"""How both services run in the foreground: until SIGTERM or SIGINT, then their own graceful stop."""

from __future__ import annotations

import asyncio
import gc
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path

from imagegen_common.loop_lag import LoopLagMonitor


async def run_until_signalled(stop_app: Callable[[], Awaitable[None]], loop_lag_file: Path | None) -> None:
    """Waits for SIGTERM/SIGINT, then awaits `stop_app` (drain, hand back, close), with an optional lag monitor."""
    settle_heap()
    lag = LoopLagMonitor(loop_lag_file).start() if loop_lag_file else None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await stop_app()
    if lag is not None:
        await lag.stop()


def settle_heap() -> None:
    """Moves everything alive once the service is up (modules, settings, servers: about 65,000 objects) out
    of the cycle collector's reach.

    A full collection walks every tracked object, so with those in the heap each one stopped the event loop
    for 20-40 ms (measured: nine of them in a 40 s CreateJob run), long enough to show in every latency
    percentile. Frozen, they are never walked again and a full collection takes 1-4 ms; they are never
    garbage anyway. Collected first so that no garbage of the start-up is frozen with them.
    """
    gc.collect()
    gc.freeze()
