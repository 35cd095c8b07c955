"""How many WatchJob streams one user, and one connection, may hold open at once.

A stream costs memory for as long as it is open (its task, its subscription, its queue): one user opened 5,000
on one connection and the process grew from 79 to 222 MB. Past either cap a new stream is refused with
RESOURCE_EXHAUSTED; every count is given back when its stream ends, and a user or connection with no stream
left is forgotten, so nothing is kept for streams that are gone.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from imagegen_common.errors import ErrorKind, ServiceError

REASON = "TOO_MANY_WATCH_STREAMS"


class WatchStreams:
    """Open WatchJob streams, counted per user and per connection. A cap of 0 is no cap."""

    def __init__(self, per_user: int, per_connection: int) -> None:
        self._per_user = per_user
        self._per_connection = per_connection
        self._users: dict[str, int] = {}
        self._connections: dict[str, int] = {}
        self.open_streams = 0

    def tracked(self) -> tuple[int, int]:
        """How many users and how many connections have a stream open (the size of what is kept)."""
        return len(self._users), len(self._connections)

    @contextmanager
    def holding(self, user: str | None, connection: str) -> Iterator[None]:
        """One stream for `user` (None: not counted per user, a service acting for many) on `connection`."""
        if user is not None:
            self._refuse_past(self._users.get(user, 0), self._per_user, "per_user", "this user")
        self._refuse_past(
            self._connections.get(connection, 0), self._per_connection, "per_connection", "this connection"
        )
        if user is not None:
            self._users[user] = self._users.get(user, 0) + 1
        self._connections[connection] = self._connections.get(connection, 0) + 1
        self.open_streams += 1
        try:
            yield
        finally:
            self.open_streams -= 1
            if user is not None:
                _give_back(self._users, user)
            _give_back(self._connections, connection)

    @staticmethod
    def _refuse_past(count: int, cap: int, limit: str, whose: str) -> None:
        if cap and count >= cap:
            raise ServiceError(
                ErrorKind.RESOURCE_EXHAUSTED,
                REASON,
                f"{whose} already has {cap} WatchJob streams open; close one first",
                metadata={"limit": limit, "max_streams": str(cap)},
            )


def _give_back(counts: dict[str, int], key: str) -> None:
    left = counts[key] - 1
    if left:
        counts[key] = left
    else:
        del counts[key]
