"""Both services as processes with metrics and JSON logs: counters move with a job, logs and traces line up."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from imagegen.job.v1 import job_service_pb2 as pb
from prometheus_client.parser import text_string_to_metric_families

from imagegen_client import ImageGenClient
from imagegen_common.dev_tokens import mint_token
from tests.support.processes import ServiceProcess, free_port, generator_process, job_process

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture
def services(private_database_url: str, tmp_path: Path) -> Iterator[tuple[ServiceProcess, ServiceProcess]]:
    generator = generator_process(tmp_path, GEN_METRICS_PORT=str(free_port()), GEN_METRICS_HOST="127.0.0.1").start()
    jobs = job_process(
        tmp_path,
        private_database_url,
        generator.target,
        JOB_METRICS_PORT=str(free_port()),
        JOB_METRICS_HOST="127.0.0.1",
    ).start()
    yield jobs, generator
    for process in (jobs, generator):
        if process.alive():
            process.terminate()


async def scrape(process: ServiceProcess) -> Samples:
    port = process.env["JOB_METRICS_PORT" if process.module == "job_service" else "GEN_METRICS_PORT"]
    async with httpx.AsyncClient() as http:
        response = await http.get(f"http://127.0.0.1:{port}/metrics", timeout=10)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def test_metrics_move_with_a_job_and_logs_carry_ids_and_one_trace(
    services: tuple[ServiceProcess, ServiceProcess],
) -> None:
    jobs, generator = services
    user = str(uuid.uuid4())
    job_before, gen_before = await scrape(jobs), await scrape(generator)

    async with ImageGenClient(jobs.target, mint_token(user_id=user)) as client:
        job = await client.create_job("metrics, please", sample_count=2)
        done = await client.wait(job.id, timeout=60)
    assert done.state == pb.JOB_STATE_COMPLETED and done.credits_charged == 2

    job_after, gen_after = await scrape(jobs), await scrape(generator)

    def moved(before: Samples, after: Samples, name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    transitions = "imagegen_job_transitions_total"
    assert moved(job_before, job_after, transitions, event="created", state="pending") == 1
    assert moved(job_before, job_after, transitions, event="attempt_started", state="generating") == 1
    assert moved(job_before, job_after, transitions, event="image_stored", state="generating") == 2
    assert moved(job_before, job_after, transitions, event="completed", state="completed") == 1
    for kind in ("reserved", "captured", "released"):
        assert moved(job_before, job_after, "imagegen_credits_total", kind=kind) == 2, kind
    create_calls = {"grpc_service": "imagegen.job.v1.JobService", "grpc_method": "CreateJob", "grpc_type": "unary"}
    assert moved(job_before, job_after, "grpc_server_handling_seconds_count", **create_calls, grpc_code="OK") == 1
    # Each attempt travels on a GenerateMany stream and is observed on both sides as a call of its own.
    attempts = {
        "grpc_service": "imagegen.generator.v1.GeneratorService",
        "grpc_method": "GenerateMany",
        "grpc_type": "attempt",
    }
    assert moved(job_before, job_after, "grpc_client_handling_seconds_count", **attempts, grpc_code="OK") == 1
    assert value(job_after, "imagegen_queue_depth") >= 0
    assert ("imagegen_jobs", frozenset({("state", "pending")})) in job_after
    assert ("imagegen_queue_oldest_age_seconds", frozenset()) in job_after

    assert moved(gen_before, gen_after, "grpc_server_handling_seconds_count", **attempts, grpc_code="OK") == 1
    # The process itself, on both: the standard process/python collectors, and the cycle collector's pauses
    # (the full collection each service makes once it is up is the first one counted).
    for samples in (job_after, gen_after):
        assert value(samples, "process_resident_memory_bytes") > 10_000_000
        assert value(samples, "python_gc_pause_seconds_count", generation="2") >= 1
        assert value(samples, "python_gc_pause_seconds_bucket", generation="2", le="+Inf") == value(
            samples, "python_gc_pause_seconds_count", generation="2"
        )

    local = {"provider": "local", "model": "local"}
    assert moved(gen_before, gen_after, "imagegen_provider_seconds_count", **local, outcome="ok") == 1
    assert moved(gen_before, gen_after, "imagegen_provider_images_total", **local, result="returned") == 2
    assert moved(gen_before, gen_after, "imagegen_storage_upload_seconds_count", backend="local", outcome="ok") == 2

    # Logs: one JSON line per RPC and per transition, with the ids; one trace across both services.
    job_log, gen_log = jobs.log_entries(), generator.log_entries()
    create = [e for e in job_log if e["event"] == "rpc" and e["method"] == "/imagegen.job.v1.JobService/CreateJob"]
    assert len(create) == 1
    assert create[0]["code"] == "OK" and create[0]["job_id"] == job.id and create[0]["user_id"] == user
    assert create[0]["request_id"] and create[0]["peer"] and isinstance(create[0]["duration_ms"], float)
    transitions_logged = [e["job_event"] for e in job_log if e["event"] == "job transition" and e["job_id"] == job.id]
    assert transitions_logged[0] == "created" and transitions_logged[-1] == "completed"
    assert all(e["user_id"] == user for e in job_log if e["event"] == "job transition" and e["job_id"] == job.id)

    call = [e for e in job_log if e["event"] == "rpc call" and e.get("job_id") == job.id]
    assert len(call) == 1 and call[0]["code"] == "OK" and call[0]["attempt"] == 1
    served = [e for e in gen_log if e["event"] == "rpc" and e.get("job_id") == job.id]
    assert len(served) == 1 and served[0]["method"] == "/imagegen.generator.v1.GeneratorService/GenerateMany"
    assert served[0]["trace_id"] == call[0]["trace_id"], "the generator continues JobService's trace"
    assert served[0]["parent_span_id"] == call[0]["span_id"]
    assert served[0]["user_id"] == user and served[0]["service"] == "generator_service"
    # Lines the generator writes while serving the call carry the same trace (the provider's, the servicer's).
    inside = [e for e in gen_log if e.get("trace_id") == call[0]["trace_id"] and e["event"] != "rpc"]
    assert inside and all(e.get("job_id") == job.id for e in inside)
