"""How both services run in the foreground: until SIGTERM or SIGINT, then their own graceful stop."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path

from imagegen_common.loop_lag import LoopLagMonitor


async def run_until_signalled(stop_app: Callable[[], Awaitable[None]], loop_lag_file: Path | None) -> None:
    """Waits for SIGTERM/SIGINT, then awaits `stop_app` (drain, hand back, close), with an optional lag monitor."""
    lag = LoopLagMonitor(loop_lag_file).start() if loop_lag_file else None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await stop_app()
    if lag is not None:
        await lag.stop()
