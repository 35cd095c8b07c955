"""One background loop for the service's periodic work (storage sweeps, retention passes, webhook claims)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

import structlog

from job_service.store import CONNECTION_ERRORS

log = structlog.get_logger(__name__)


class PeriodicTask:
    """Runs `step` in a task of its own, again and again until stopped.

    `step` does one round and returns how long to wait before the next (0: at once, e.g. after a full batch); a
    `wake()` ends the wait early. A round that fails is logged (a database that is away as a warning: it comes
    back; anything else with its traceback) and the next waits `after_failure(failures in a row)` seconds: the
    loop never ends on an error, only on `stop`.
    """

    def __init__(
        self, name: str, round_name: str, step: Callable[[], Awaitable[float]], *, after_failure: Callable[[int], float]
    ) -> None:
        self._name = name  # the task's
        self._round_name = round_name  # what the logs call one round ("storage sweep")
        self._step = step
        self._after_failure = after_failure
        self._wake = asyncio.Event()
        self._stopping = False
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name=self._name)

    def wake(self) -> None:
        """Runs the next round now instead of at the end of the wait."""
        self._wake.set()

    async def stop(self, patience_seconds: float) -> None:
        """Lets a round under way finish within `patience_seconds` (0: none), then cancels it and stops."""
        self._stopping = True
        self._wake.set()
        if self._task is None:
            return
        if patience_seconds > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._task), timeout=patience_seconds)
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)

    async def _loop(self) -> None:
        failures = 0
        while not self._stopping:
            self._wake.clear()
            try:
                wait = await self._step()
                failures = 0
            except CONNECTION_ERRORS as exc:
                failures += 1
                log.warning(f"{self._round_name} failed; will retry", error=str(exc) or type(exc).__name__)
                wait = self._after_failure(failures)
            except Exception:
                failures += 1
                log.exception(f"{self._round_name} failed unexpectedly; will retry")
                wait = self._after_failure(failures)
            if wait > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=wait)
