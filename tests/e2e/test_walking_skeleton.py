"""Both services as real processes: the CLI makes images, grpcurl sees both APIs, jobs survive a restart."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest
from PIL import Image

from tests.support.ledger import assert_credits_consistent
from tests.support.processes import ROOT, ServiceProcess, generator_process, job_process

GRPCURL = str(Path(sys.executable).parent / "grpcurl")
CLI = str(Path(sys.executable).parent / "imagegen")


@pytest.fixture
def services(database_url: str, tmp_path: Path) -> Iterator[tuple[ServiceProcess, ServiceProcess]]:
    generator = generator_process(tmp_path).start()
    jobs = job_process(tmp_path, database_url, generator.target).start()
    yield jobs, generator
    for process in (jobs, generator):
        if process.alive():
            process.terminate()


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=120, cwd=ROOT, env=env, check=False)


def test_grpcurl_lists_services_and_health_is_serving(
    services: tuple[ServiceProcess, ServiceProcess],
) -> None:
    jobs, generator = services
    listed = run(GRPCURL, "-plaintext", jobs.target, "list")
    assert listed.returncode == 0, listed.stderr
    assert set(listed.stdout.split()) >= {
        "imagegen.job.v1.JobService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    }
    assert "imagegen.generator.v1.GeneratorService" in run(GRPCURL, "-plaintext", generator.target, "list").stdout
    for target in (jobs.target, generator.target):
        health = run(GRPCURL, "-plaintext", target, "grpc.health.v1.Health/Check")
        assert json.loads(health.stdout) == {"status": "SERVING"}
    described = run(GRPCURL, "-plaintext", jobs.target, "describe", "imagegen.job.v1.JobService")
    assert "rpc CreateJob ( .imagegen.job.v1.CreateJobRequest )" in described.stdout
    assert "rpc WatchJob ( .imagegen.job.v1.WatchJobRequest ) returns ( stream" in described.stdout


async def test_cli_generates_four_images_and_the_job_survives_a_restart(
    services: tuple[ServiceProcess, ServiceProcess], tmp_path: Path, database_url: str
) -> None:
    jobs, _generator = services
    out = tmp_path / "out"
    env = {"PATH": str(Path(sys.executable).parent), "IMAGEGEN_TARGET": jobs.target}
    result = run(CLI, "generate", "Robot holding skateboard", "-n", "4", "--aspect", "16:9", "--out", str(out), env=env)
    assert result.returncode == 0, result.stderr + jobs.log_tail()
    paths = [Path(line) for line in result.stdout.split()]
    assert len(paths) == 4
    for path in paths:
        with Image.open(path) as picture:
            assert (picture.format, picture.size) == ("PNG", (1408, 768))
    job_id = paths[0].name.split("-")[0:5]
    job_id_text = "-".join(job_id)

    conn = await asyncpg.connect(database_url)
    try:
        status = await conn.fetchval("SELECT status FROM generation_jobs WHERE id = $1", job_id_text)
        events = [
            r["type"]
            for r in await conn.fetch("SELECT type FROM job_events WHERE job_id = $1 ORDER BY seq", job_id_text)
        ]
        assert status == "completed"
        assert events[0] == "created" and events[-1] == "completed" and events.count("image_stored") == 4
        await assert_credits_consistent(conn)
    finally:
        await conn.close()

    # Stop JobService and start it again: the job is still there.
    assert jobs.terminate() == 0
    jobs.start()
    shown = run(CLI, "jobs", "get", job_id_text, env=env)
    assert shown.returncode == 0, shown.stderr
    assert job_id_text in shown.stdout and "COMPLETED" in shown.stdout
