"""A request that cannot reach the database answers UNAVAILABLE (retryable), not INTERNAL."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from imagegen_common.grpc_errors import from_grpc_error
from tests.support.services import running_services


async def test_database_gone_is_unavailable_not_internal(database_url: str, tmp_path: Path) -> None:
    async with running_services(database_url, tmp_path) as services, services.client() as client:
        await client.create_job("before", sample_count=1)
        # Close every database connection of this JobService under its feet (closing it again at stop is fine).
        services.job.pool.terminate()
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await client.create_job("after", sample_count=1)

    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert from_grpc_error(caught.value).reason == "DEPENDENCY_UNAVAILABLE"
