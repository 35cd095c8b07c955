"""The compose stack, run with podman, checked as a user would check it: only through its published ports.

Started by scripts/compose_test.sh (`make compose-test`), which builds the image, exports the secrets and free host
ports, runs the healthchecks and removes the stack afterwards. Each step prints what it saw and how long it took;
any failure raises, with the containers' last log lines.

1. `up` (staged as Docker Compose would order it; podman-compose cannot wait on a one-shot, docs/deploy.md):
   every service healthy; no secret or token missing.
2. Jobs complete and spread over both generator replicas; every image downloads from the one image server.
3. One generator restarted while jobs run: no job is lost, downloads keep working throughout, and afterwards the
   restarted replica gets its share again within seconds.
4. `down` then `up`: jobs, credits and images are all still there.
5. Every container runs as a user other than root.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "gen")]

import grpc  # noqa: E402
from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402
from imagegen.job.v1 import job_service_pb2 as pb  # noqa: E402

from imagegen_client import ImageGenClient, RetryPolicy  # noqa: E402
from imagegen_common.dev_tokens import mint_token  # noqa: E402

PROJECT = os.environ["COMPOSE_PROJECT"]
FILES = os.environ["COMPOSE_FILES"].split()
JOB = f"127.0.0.1:{os.environ['IMAGEGEN_JOB_PORT']}"
IMAGES = f"http://127.0.0.1:{os.environ['IMAGEGEN_IMAGES_PORT']}"
METRICS = f"http://127.0.0.1:{os.environ['IMAGEGEN_METRICS_PORT']}/metrics"
SECRET = os.environ["SUPABASE_JWT_SECRET"]
GENERATORS = [f"{PROJECT}_generator_1", f"{PROJECT}_generator_2"]
OURS = ["migrate", "generator_1", "generator_2", "images", "job"]
STARTED = time.monotonic()


def say(message: str) -> None:
    print(f"== compose-test [{time.monotonic() - STARTED:5.1f}s] {message}", flush=True)


def run(args: Sequence[str], *, check: bool = True, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(list(args), capture_output=True, text=True, timeout=600, check=False, env=env)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}")
    return done.stdout + done.stderr


def compose(*args: str, check: bool = True, env: dict[str, str] | None = None) -> str:
    files = [part for f in FILES for part in ("-f", f)]
    return run(["podman-compose", "-p", PROJECT, *files, *args], check=check, env=env)


def container(service: str) -> str:
    return f"{PROJECT}_{service}" if service[-2:-1] == "_" else f"{PROJECT}_{service}_1"


def logs(name: str, lines: int = 40) -> str:
    return run(["podman", "logs", "--tail", str(lines), name], check=False)


def diagnose() -> str:
    return "\n".join(f"--- {name}\n{logs(container(name))}" for name in ["postgres", *OURS])


def up() -> None:
    """Docker Compose's order (postgres healthy, migrate done, generators healthy, then job), made explicit."""
    began = int(time.time()) - 1
    compose("up", "-d", "--no-deps", "postgres", "migrate", "generator", "images")
    # migrate was started with the database, not after it: it must wait for it by itself (bounded). Its exit is
    # awaited by state and start time, not `podman wait`, which answers at once for a container that exited
    # before (podman-compose may start the previous up's migrate container again instead of a new one).
    deadline, state = time.monotonic() + 180, ""
    while time.monotonic() < deadline:
        fields = "{{.State.Status}} {{.State.ExitCode}} {{.State.StartedAt.Unix}}"
        state = run(["podman", "inspect", "--format", fields, container("migrate")], check=False).strip()
        status, code, started = [*state.split(), "", "", "0"][:3]
        if status == "exited" and started.isdigit() and int(started) >= began:
            assert code == "0", f"migrate exited {code}:\n{logs(container('migrate'))}"
            break
        time.sleep(0.5)
    else:
        raise AssertionError(f"migrate did not finish within 180 s ({state}):\n{logs(container('migrate'))}")
    compose("up", "-d", "--no-deps", "job")
    wait_healthy(["postgres", "generator_1", "generator_2", "images", "job"])
    wait_serving(JOB)


def wait_healthy(services: list[str], timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    status: dict[str, str] = {}
    while time.monotonic() < deadline:
        for service in services:
            out = run(["podman", "inspect", "--format", "{{.State.Health.Status}}", container(service)], check=False)
            status[service] = out.strip()
        if all(s == "healthy" for s in status.values()):
            return
        time.sleep(1)
    raise AssertionError(f"not healthy within {timeout:g} s: {status}\n{diagnose()}")


def wait_serving(target: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with grpc.insecure_channel(target) as channel:
            try:
                answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
                if answer.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
        time.sleep(0.5)
    raise AssertionError(f"{target} not SERVING within {timeout:g} s\n{diagnose()}")


async def run_jobs(users: list[str], per_user: int, label: str) -> list[pb.Job]:
    """per_user jobs for each user (JOB_ACTIVE_JOBS_PER_USER is 4), created at once, awaited to the end."""

    async def one_user(user: str) -> list[pb.Job]:
        async with ImageGenClient(JOB, mint_token(SECRET, user_id=user), retry=RetryPolicy(attempts=3)) as client:
            created = [await client.create_job(f"{label} {user[:8]} {i}", sample_count=2) for i in range(per_user)]
            return [await client.wait(job.id, timeout=180) for job in created]

    done = await asyncio.gather(*(one_user(user) for user in users))
    return [job for jobs in done for job in jobs]


def jobs(users: list[str], per_user: int, label: str) -> list[pb.Job]:
    try:
        done = asyncio.run(run_jobs(users, per_user, label))
    except Exception as exc:
        raise AssertionError(f"{label}: {exc!r}\n{diagnose()}") from exc
    states = [pb.JobState.Name(job.state) for job in done]
    assert states == ["JOB_STATE_COMPLETED"] * len(done), f"{label}: {states}\n{diagnose()}"
    assert all(len(job.images) == 2 for job in done), f"{label}: a job without its 2 images"
    return done


def served_by(done: list[pb.Job]) -> dict[str, int]:
    """How many of these jobs each generator replica logged an attempt of (its JSON `rpc` lines name the job)."""
    counts = {}
    for name in GENERATORS:
        text = run(["podman", "logs", name], check=False)
        counts[name] = sum(1 for job in done if f'"job_id": "{job.id}"' in text or f'"job_id":"{job.id}"' in text)
    return counts


def assert_spread(done: list[pb.Job], label: str) -> dict[str, int]:
    counts = served_by(done)
    say(f"{label}: {len(done)} jobs, attempts per replica {counts}")
    assert sum(counts.values()) >= len(done), f"{label}: some jobs were not found in any replica's log: {counts}"
    for name, count in counts.items():
        # An even split is 8/8 of 16; 6 allows for placement turns, and fails the 4/12 of streams left to age
        # out after 60 s (the 2/10) instead of the 10 s docker-compose.yml sets.
        assert count >= len(done) * 3 // 8, f"{label}: {name} served {count} of {len(done)} jobs: {counts}"
    return counts


def download(url: str) -> bytes:
    # URLs name the image server's published address (GEN_STORAGE_PUBLIC_BASE_URL), never a replica.
    assert url.startswith(f"{IMAGES}/storage/v1/object/public/"), url
    with urllib.request.urlopen(url, timeout=10) as response:
        body: bytes = response.read()
    return body


def fingerprints(done: list[pb.Job]) -> dict[str, str]:
    return {image.url: hashlib.sha256(download(image.url)).hexdigest() for job in done for image in job.images}


class Downloader(threading.Thread):
    """Downloads the given images round and round until stopped; counts successes and failures over time."""

    def __init__(self, urls: list[str]) -> None:
        super().__init__(daemon=True)
        self.urls, self.stop = urls, threading.Event()
        self.ok: list[float] = []
        self.failed: list[tuple[float, str]] = []

    def run(self) -> None:
        while not self.stop.is_set():
            for url in self.urls:
                try:
                    assert download(url)
                    self.ok.append(time.monotonic())
                except Exception as exc:  # every failure is counted and reported
                    self.failed.append((time.monotonic(), repr(exc)))
                time.sleep(0.02)


def credits(user: str) -> tuple[int, int]:
    async def ask() -> tuple[int, int]:
        async with ImageGenClient(JOB, mint_token(SECRET, user_id=user)) as client:
            balance = await client.credit_balance()
            return balance.balance, balance.reserved

    return asyncio.run(ask())


def fetch_again(done: list[pb.Job]) -> list[pb.Job]:
    async def ask() -> list[pb.Job]:
        again = []
        for job in done:
            async with ImageGenClient(JOB, mint_token(SECRET, user_id=job.user_id)) as client:
                again.append(await client.get_job(job.id))
        return again

    return asyncio.run(ask())


def users(n: int) -> list[str]:
    return [str(uuid.uuid4()) for _ in range(n)]


def main() -> None:
    # 0. The file refuses to run without its secrets, with a message that says which and how.
    without = {k: v for k, v in os.environ.items() if k != "SUPABASE_JWT_SECRET"}
    refused = compose("config", check=False, env=without)
    assert "SUPABASE_JWT_SECRET" in refused and "openssl rand" in refused, refused[-500:]
    say("without SUPABASE_JWT_SECRET, compose refuses: " + refused.strip().splitlines()[-1][:120])

    # 1. Up, as a first-time user would bring it up.
    up()
    say("up: postgres, migrate (exit 0), 2 generators, images, job: all healthy; JobService SERVING")
    metrics = urllib.request.urlopen(METRICS, timeout=5).read().decode()
    assert "grpc_server_handled_total" in metrics or "imagegen_" in metrics, metrics[:300]

    # 2. Jobs complete and spread over both replicas; images download from the image server.
    first_users = users(4)
    first = jobs(first_users, 4, "first")
    assert_spread(first, "first run")
    before = fingerprints(first)
    say(f"first run: {len(first)} jobs completed, {len(before)} images downloaded")

    # 3. A generator restarted mid-run: no job lost; downloads work all along; its share comes back.
    downloader = Downloader(list(before))
    downloader.start()
    results: list[list[pb.Job]] = []
    runner = threading.Thread(target=lambda: results.append(jobs(users(6), 4, "restart")), daemon=True)
    runner.start()
    time.sleep(2.0)  # attempts in flight on both replicas (each takes 1-2.5 s)
    restart_began = time.monotonic()
    run(["podman", "restart", GENERATORS[0]])
    restart_ended = time.monotonic()
    runner.join(timeout=300)
    assert results, f"the jobs started before the restart did not finish\n{diagnose()}"
    # Mid-run for real: the restarted replica had attempts of these jobs when its SIGTERM came (logged before
    # its "shutting down"), and they all completed above: drained, or handed over and retried elsewhere.
    stopped_log = run(["podman", "logs", GENERATORS[0]], check=False)
    stop_at = stopped_log.rfind("shutting down")
    assert stop_at != -1, f"{GENERATORS[0]} logged no shutdown"
    in_flight = [job for job in results[0] if job.id in stopped_log[:stop_at]]
    assert in_flight, f"{GENERATORS[0]} was restarted before it ran any of the jobs"
    wait_healthy(["generator_1"])
    downloader.stop.set()
    downloader.join(timeout=30)
    during = [t for t in downloader.ok if restart_began <= t <= restart_ended]
    say(
        f"restart of {GENERATORS[0]} took {restart_ended - restart_began:.1f} s with {len(in_flight)} of the jobs "
        f"begun on it: {len(results[0])} jobs all completed; {len(downloader.ok)} downloads "
        f"({len(during)} during the restart), {len(downloader.failed)} failed"
    )
    assert not downloader.failed, f"downloads failed during the restart: {downloader.failed[:5]}"
    assert during, "no download happened while the generator restarted"
    time.sleep(12)  # JOB_GENERATOR_STREAM_MAX_AGE_SECONDS (10) and a little: streams are placed anew
    assert_spread(jobs(users(4), 4, "after-restart"), "after the restart")

    # 4. Down, then up: the volumes keep jobs, credits and images.
    balances = {user: credits(user) for user in first_users}
    compose("down")
    say("down (volumes kept)")
    up()
    say("up again")
    again = fetch_again(first)
    assert [pb.JobState.Name(j.state) for j in again] == ["JOB_STATE_COMPLETED"] * len(first)
    assert [[i.url for i in j.images] for j in again] == [[i.url for i in j.images] for j in first]
    assert {user: credits(user) for user in first_users} == balances, "credits changed across down/up"
    assert fingerprints(first) == before, "images changed or vanished across down/up"
    migrate_log = run(["podman", "logs", container("migrate")], check=False)
    states = run(["podman", "ps", "-a", "--filter", f"label=io.podman.compose.project={PROJECT}"], check=False)
    assert "applied 0 migration(s)" in migrate_log, f"{migrate_log!r}\n{states}"
    say(f"after down/up: {len(again)} jobs, {len(balances)} balances {sorted(set(balances.values()))}, images same")

    # 5. Nobody runs as root: the image's user for ours, and every process of every container.
    for service in OURS:
        user = run(["podman", "inspect", "--format", "{{.Config.User}}", container(service)]).strip()
        assert user == "imagegen", f"{service} runs as {user!r}"
    for service in ["postgres", "generator_1", "generator_2", "images", "job"]:
        rows = run(["podman", "top", container(service), "user", "huser", "comm"]).strip().splitlines()[1:]
        assert rows and all(row.split()[0] not in ("root", "0") for row in rows), f"{service}: {rows}"
    say("every container's processes run as non-root users")
    print(json.dumps({"compose_test_seconds": round(time.monotonic() - STARTED, 1)}))


if __name__ == "__main__":
    main()
