"""The sync client's whole surface and the CLI's commands, against both services running for real."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import grpc
import pytest
from imagegen.job.v1 import job_service_pb2 as pb
from PIL import Image

from imagegen_client import ImageGenSyncClient, JobTimeoutError
from imagegen_common.dev_tokens import DEV_JWT_SECRET, mint_token
from tests.support.services import new_user, running_services

CLI = str(Path(sys.executable).parent / "imagegen")
# Slow enough that a job is still generating when we cancel it or stop waiting for it.
SLOW = {"local_latency_min_seconds": 3.0, "local_latency_max_seconds": 3.0}


async def test_sync_client_covers_the_whole_api(database_url: str, tmp_path: Path) -> None:
    user = new_user()
    async with running_services(database_url, tmp_path, generator=SLOW) as services:

        def session() -> dict[str, object]:
            seen: dict[str, object] = {}
            token = mint_token(DEV_JWT_SECRET, user_id=user)
            service_token = mint_token(DEV_JWT_SECRET, service_role=True)
            with ImageGenSyncClient(services.target, token) as client:
                seen["templates"] = [t.id for t in client.list_templates()]
                first = client.create_job("first", sample_count=1, request_id="sync-first")
                seen["same"] = client.create_job("first", sample_count=1, request_id="sync-first").id == first.id
                with pytest.raises(JobTimeoutError) as waiting:
                    client.wait(first.id, timeout=0.5)
                seen["timed_out_state"] = waiting.value.job.state
                seen["watched"] = [u.job.state for u in client.watch(first.id)]
                second = client.create_job("second", sample_count=2, aspect_ratio="16:9")
                seen["cancelled"] = client.cancel_job(second.id)
                seen["second"] = client.wait(second.id, timeout=30)
                seen["listed"] = [j.id for j in client.list_jobs(page_size=10).jobs]
                seen["completed_only"] = [j.id for j in client.list_jobs(state=pb.JOB_STATE_COMPLETED).jobs]
                seen["got"] = client.get_job(first.id)
                seen["balance"] = client.credit_balance()
                with pytest.raises(grpc.RpcError) as denied:
                    client.grant_credits(user, 5)
                seen["grant_denied"] = denied.value.code()  # type: ignore[attr-defined]
                seen["first"], seen["second_id"] = first, second.id
            with ImageGenSyncClient(services.target, service_token) as admin:
                seen["granted"] = admin.grant_credits(user, 5, reason="sync test")
            return seen

        seen = await asyncio.to_thread(session)

    first = seen["first"]
    assert isinstance(first, pb.Job)
    assert "product-shot" in seen["templates"]  # type: ignore[operator]
    assert seen["same"] is True, "the request_id made the second create a replay"
    assert seen["timed_out_state"] in (pb.JOB_STATE_PENDING, pb.JOB_STATE_GENERATING)
    assert seen["watched"][-1] == pb.JOB_STATE_COMPLETED  # type: ignore[index]
    cancelled = seen["cancelled"]
    assert isinstance(cancelled, pb.Job)
    assert cancelled.state == pb.JOB_STATE_CANCELLED or cancelled.cancel_requested
    assert seen["second"].state == pb.JOB_STATE_CANCELLED  # type: ignore[attr-defined]
    assert seen["listed"] == [seen["second_id"], first.id], "newest first"
    assert seen["completed_only"] == [first.id]
    assert seen["got"].state == pb.JOB_STATE_COMPLETED  # type: ignore[attr-defined]
    balance = seen["balance"]
    assert isinstance(balance, pb.GetCreditBalanceResponse)
    assert balance.balance == 100 - 1 and balance.reserved == 0
    assert seen["grant_denied"] == grpc.StatusCode.PERMISSION_DENIED
    assert seen["granted"].balance == 100 - 1 + 5  # type: ignore[attr-defined]


async def cli(target: str, token: str, *args: str) -> tuple[int, str, str]:
    env = {**os.environ, "IMAGEGEN_TARGET": target, "IMAGEGEN_TOKEN": token}
    env.pop("COLUMNS", None)  # what a pipe gets: rich's 80 columns
    process = await asyncio.create_subprocess_exec(
        CLI, *args, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=120)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_cli_lists_watches_cancels_and_shows_credits_and_templates(database_url: str, tmp_path: Path) -> None:
    user = new_user()
    token = mint_token(DEV_JWT_SECRET, user_id=user)
    async with running_services(database_url, tmp_path, generator=SLOW) as services:
        async with services.client(token=token) as client:
            done = await client.create_job("to watch", sample_count=1)
            slow = await client.create_job("to cancel", sample_count=1)

        code, cancelled, err = await cli(services.target, token, "jobs", "cancel", slow.id)
        assert code == 0, err
        assert cancelled.startswith(slow.id) and ("CANCELLED" in cancelled or "cancel requested" in cancelled)

        code, watched, err = await cli(services.target, token, "jobs", "watch", done.id)
        assert code == 0, err
        lines = watched.splitlines()
        # The watch ends once the job has: with the COMPLETED event, or at the snapshot when the job had already
        # completed before the watch opened (a loaded machine starts the CLI slowly).
        assert lines[0].startswith("SNAPSHOT") and lines[-1].split()[1] == "COMPLETED", watched
        assert len(lines) == 1 or lines[-1].split()[0] == "COMPLETED", watched

        code, listed, err = await cli(services.target, token, "jobs", "list")
        assert code == 0, err
        assert done.id in listed and slow.id in listed, listed
        assert listed.index(slow.id) < listed.index(done.id), "newest first"
        assert "COMPLETED" in listed

        code, only, err = await cli(services.target, token, "jobs", "list", "--state", "completed")
        assert code == 0, err
        assert done.id in only and slow.id not in only

        code, balance, err = await cli(services.target, token, "credits")
        assert code == 0, err
        assert balance.startswith("balance ") and "reserved" in balance

        code, templates, err = await cli(services.target, token, "templates")
        assert code == 0, err
        assert "product-shot" in templates and "wallpaper" in templates

        code, listed_models, err = await cli(services.target, token, "models")
        assert code == 0, err
        local_row = next(line for line in listed_models.splitlines() if " local " in line)
        assert "1K, 2K, 4K" in local_row and "21:9" in local_row and "seed" in local_row

        code, paths, err = await cli(
            services.target, token, "generate", "a fox", "-n", "1", "--size", "4K", "--aspect", "21:9",
            "--seed", "3", "--no-watermark", "--jpeg", "80", "--out", str(tmp_path / "cli-images"),
        )  # fmt: skip
        assert code == 0, err
        (path,) = paths.split()
        assert path.endswith(".jpg")
        with Image.open(path) as drawn:
            assert (drawn.format, drawn.size) == ("JPEG", (6256, 2688))  # 4K at 21:9: about 4096² pixels

        red = tmp_path / "red.png"
        Image.new("RGB", (120, 120), (255, 0, 0)).save(red)
        code, paths, err = await cli(
            services.target, token, "generate", "make it night", "-n", "1", "--image", str(red),
            "--out", str(tmp_path / "cli-images"),
        )  # fmt: skip
        assert code == 0, err
        (night,) = paths.split()
        source_job = Path(night).name.rsplit("-", 1)[0]
        code, paths, err = await cli(
            services.target, token, "edit", source_job, "--index", "0", "add a red scarf",
            "--out", str(tmp_path / "cli-images"),
        )  # fmt: skip
        assert code == 0, err
        (edited,) = paths.split()
        async with services.client(token=token) as client:
            edit_job = await client.get_job(Path(edited).name.rsplit("-", 1)[0])
        assert (edit_job.parent_job_id, edit_job.parent_image_index) == (source_job, 0)
        assert edit_job.model == "local" and edit_job.input_images[0].job_image.job_id == source_job

        code, _, err = await cli(services.target, token, "jobs", "get", "00000000-0000-4000-8000-000000000000")
        assert code == 1 and "NOT_FOUND" in err


async def test_cli_and_sync_client_delete_jobs(database_url: str, tmp_path: Path) -> None:
    user = new_user()
    token = mint_token(DEV_JWT_SECRET, user_id=user)
    async with running_services(database_url, tmp_path) as services:
        async with services.client(token=token) as client:
            by_cli = await client.wait((await client.create_job("to delete", sample_count=1)).id, timeout=60)
            by_sync = await client.wait((await client.create_job("also to delete", sample_count=1)).id, timeout=60)

        code, out, err = await cli(services.target, token, "jobs", "delete", by_cli.id)
        assert code == 0, err
        assert out.strip() == f"{by_cli.id} deleted"
        code, _, err = await cli(services.target, token, "jobs", "get", by_cli.id)
        assert code == 1 and "NOT_FOUND" in err
        code, _, err = await cli(services.target, token, "jobs", "delete", by_cli.id)
        assert code == 1 and "NOT_FOUND" in err, "a deleted job is not there to delete again"

        def sync_session() -> grpc.StatusCode:
            with ImageGenSyncClient(services.target, token) as sync:
                sync.delete_job(by_sync.id)
                with pytest.raises(grpc.RpcError) as gone:
                    sync.get_job(by_sync.id)
                return gone.value.code()  # type: ignore[attr-defined]

        assert await asyncio.to_thread(sync_session) == grpc.StatusCode.NOT_FOUND
