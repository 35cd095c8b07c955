"""HeldInputs: what one CreateJob stored is released when it ends, whatever the outcome (job_service/input_holds.py)."""

from __future__ import annotations

import asyncio

import pytest

from imagegen_common.errors import ErrorKind, ServiceError
from job_service.input_holds import HeldInputs

REFUSED = ServiceError(ErrorKind.RESOURCE_EXHAUSTED, "TOO_MANY_ACTIVE_JOBS", "refused")


class FakeStore:
    def __init__(self, *, release_fails: bool = False) -> None:
        self.puts: list[list[str]] = []
        self.releases: list[tuple[str, list[str]]] = []
        self.release_fails = release_fails

    async def put_input_blobs(self, user_id: str, blobs: list[tuple[str, str, bytes]]) -> None:
        self.puts.append([digest for digest, _, _ in blobs])

    async def release_input_blobs(self, user_id: str, digests: list[str]) -> int:
        if self.release_fails:
            raise ConnectionError("database down")
        self.releases.append((user_id, digests))
        return len(digests)


async def test_what_a_create_stored_is_released_in_sha256_order_when_it_is_refused() -> None:
    store = FakeStore()
    with pytest.raises(ServiceError):
        async with HeldInputs(store) as held:
            await held.put("u", [("b" * 64, "image/png", b"1"), ("a" * 64, "image/png", b"2")])
            raise REFUSED

    assert store.puts == [["a" * 64, "b" * 64]]
    assert store.releases == [("u", ["a" * 64, "b" * 64])]


async def test_a_create_that_stored_nothing_releases_nothing() -> None:
    store = FakeStore()
    async with HeldInputs(store):
        pass
    assert store.releases == []


async def test_a_failed_release_does_not_replace_the_creates_own_outcome() -> None:
    store = FakeStore(release_fails=True)
    with pytest.raises(ServiceError):
        async with HeldInputs(store) as held:
            await held.put("u", [("a" * 64, "image/png", b"1")])
            raise REFUSED
    async with HeldInputs(store) as held:  # and a create that succeeded still succeeds
        await held.put("u", [("a" * 64, "image/png", b"1")])


@pytest.mark.parametrize("error", [asyncio.CancelledError(), ConnectionError("database gone mid-create")])
async def test_a_create_whose_outcome_is_unknown_keeps_its_holds(error: BaseException) -> None:
    # Its job may still be committed (a group commit goes on for a caller that left): the sweep decides later.
    store = FakeStore()
    with pytest.raises(type(error)):
        async with HeldInputs(store) as held:
            await held.put("u", [("a" * 64, "image/png", b"1")])
            raise error
    assert store.releases == []
