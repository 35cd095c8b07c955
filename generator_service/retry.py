"""When to try an outbound HTTP call again: exponential backoff with jitter, Retry-After, a time budget.

Shared by the provider HTTP client and Supabase storage so both retry the same, predictable way.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime


@dataclass(frozen=True)
class RetryPolicy:
    max_retries: int = 3
    # No retry starts if it would end (after its wait) later than this many seconds after the first try.
    max_total_seconds: float = 90.0
    backoff_initial_seconds: float = 1.0
    backoff_max_seconds: float = 30.0
    jitter: random.Random = field(default_factory=random.Random, compare=False, repr=False)

    def next_delay(self, retries_done: int, elapsed: float, retry_after: float | None = None) -> float | None:
        """Seconds to wait before retry number `retries_done + 1`, or None when the budget is spent.

        A server's Retry-After wins over the backoff: retrying sooner would only earn another 429.
        """
        if retries_done >= self.max_retries:
            return None
        if retry_after is not None:
            delay = max(0.0, retry_after)
        else:
            ceiling = min(self.backoff_max_seconds, self.backoff_initial_seconds * 2**retries_done)
            # "Equal jitter": at least half the backoff, so retries never bunch up at zero, and a random
            # rest, so many callers that failed together do not come back together.
            delay = ceiling / 2 + self.jitter.uniform(0, ceiling / 2)
        if elapsed + delay > self.max_total_seconds:
            return None
        return delay


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Retry-After as seconds: either delta-seconds or an HTTP date (RFC 9110 §10.2.3)."""
    if value is None or not value.strip():
        return None
    text = value.strip()
    try:
        return max(0.0, float(text))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())
