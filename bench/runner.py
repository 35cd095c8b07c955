"""Runs every section of the bench against real service processes and collects the figures.

Each section gets a fresh database (on the bench's own embedded PostgreSQL in .data/bench-postgres, or on
the server DATABASE_URL points at) and fresh processes: the provider stand-in, one GeneratorService, and
JobService replicas sharing one port (SO_REUSEPORT, which grpc enables by default on Linux), so that
peak RSS and loop lag belong to that section alone. Load comes from `bench.loadgen` in its own process.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import psutil  # type: ignore[import-untyped]

from bench import stats
from bench.procs import ROOT, Proc, Profiler, clean_env, free_port, machine_load, postgres_backends_cpu
from imagegen_common.dev_tokens import DEV_JWT_SECRET, mint_token
from imagegen_common.migrate import migrate

RESULTS_DIR = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Scale:
    """How much of everything one run does."""

    name: str
    users: int
    concurrencies: tuple[int, ...]
    closed_seconds: float
    warmup_seconds: float
    open_rate: float
    open_seconds: float
    e2e_latency_jobs: int
    e2e_burst_jobs: int
    capacity_jobs: int
    capacity_latency: tuple[float, float]
    big_jobs: int
    big_latency: tuple[float, float]
    fanout_jobs: int
    fanout_watchers: int
    fanout_latency: tuple[float, float]
    warmup_jobs: int = 10  # one after another through fresh services before the fan-out is measured
    job_timeout: float = 240.0  # a watcher that sees no terminal state by then counts as an error
    channels: int = 8


FULL = Scale(
    name="full",
    users=1000,
    concurrencies=(1, 16, 64, 256),
    closed_seconds=5.0,
    warmup_seconds=1.5,
    open_rate=1000.0,
    open_seconds=10.0,
    e2e_latency_jobs=200,
    e2e_burst_jobs=500,
    capacity_jobs=2000,
    capacity_latency=(5.0, 30.0),
    big_jobs=50,
    big_latency=(1.0, 3.0),
    fanout_jobs=100,
    fanout_watchers=10,
    fanout_latency=(4.0, 7.0),
)
QUICK = Scale(
    name="quick",
    users=20,
    concurrencies=(1, 16, 64, 256),
    closed_seconds=1.0,
    warmup_seconds=0.3,
    open_rate=200.0,
    open_seconds=1.0,
    e2e_latency_jobs=10,
    e2e_burst_jobs=20,
    capacity_jobs=40,
    capacity_latency=(0.5, 1.5),
    big_jobs=2,
    big_latency=(0.2, 0.5),
    fanout_jobs=4,
    fanout_watchers=5,
    fanout_latency=(1.5, 2.0),
    job_timeout=30.0,
)
SCALES = {"full": FULL, "quick": QUICK}
SECTIONS = ("ceiling", "create_job", "e2e", "capacity", "burst_2k", "fanout")


@dataclass
class Options:
    scale: Scale
    sections: tuple[str, ...] = SECTIONS
    job_replicas: int = 1
    generator_replicas: int = 1
    output: Path = RESULTS_DIR / "latest.json"
    keep_logs: bool = False
    profile: bool = False
    generator_env: dict[str, str] = field(default_factory=dict)
    job_env: dict[str, str] = field(default_factory=dict)


def _with_database(url: str, database: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path=f"/{database}"))


def _shm_root() -> Path:
    shm = Path("/dev/shm")
    return shm if shm.is_dir() and os.access(shm, os.W_OK) else ROOT / ".data"


def _models_json(scale: Scale) -> tuple[list[dict[str, Any]], dict[str, list[float]]]:
    """The bench's models: every one is the gemini-imagen provider (Imagen :predict) pointed at bench.provider.

    Concurrency and rate limits are lifted (8192 in flight, no requests-per-minute pacing): they are
    quotas, and the bench measures the system, not a quota.
    """
    latencies = {
        "bench-zero": [0.0, 0.0],
        "bench-inflight": list(scale.capacity_latency),
        "bench-2k": list(scale.big_latency),
        "bench-fanout": list(scale.fanout_latency),
    }
    models = [
        {
            "id": name,
            "provider": "gemini-imagen",
            "provider_model": name,
            "display_name": f"bench provider, latency {low}-{high} s",
            "image_sizes": ["1K", "2K"],
            "max_concurrency": 8192,
            "requests_per_minute": 0,
        }
        for name, (low, high) in latencies.items()
    ]
    return models, latencies


class Bench:
    def __init__(self, options: Options) -> None:
        self.options = options
        self.scale = options.scale
        self.run_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
        self.run_dir = ROOT / ".data" / "bench-runs" / self.run_id
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.storage_root = _shm_root() / f"imagegen-bench-{self.run_id}"
        self.models, self.latencies = _models_json(self.scale)
        self.user_ids = [str(uuid.uuid4()) for _ in range(self.scale.users)]
        self.tokens = [mint_token(DEV_JWT_SECRET, user_id=u, ttl_seconds=4 * 3600) for u in self.user_ids]
        self.service_token = mint_token(DEV_JWT_SECRET, service_role=True, ttl_seconds=4 * 3600)
        self.embedded: Any = None
        self.admin_url = ""
        self.settings_used: dict[str, Any] = {}
        self.profiles: dict[str, Any] = {}

    def profiler(self, stack: Stack, label: str, seconds: float) -> Profiler | None:
        """With --profile: py-spy on every service process for `seconds` (call finish_profile after)."""
        if not self.options.profile:
            return None
        return Profiler(stack.services(), seconds, self.run_dir / "profiles", label).start()

    def finish_profile(self, profiler: Profiler | None, label: str) -> None:
        if profiler is not None:
            self.profiles[label] = profiler.finish()

    # -- infrastructure ---------------------------------------------------------------------------

    def start_database(self) -> None:
        if os.environ.get("DATABASE_URL"):
            self.admin_url = os.environ["DATABASE_URL"]
            return
        from imagegen_common.embedded_postgres import EmbeddedPostgres

        self.embedded = EmbeddedPostgres(ROOT / ".data" / "bench-postgres")
        self.admin_url = self.embedded.url()

    def stop_database(self) -> None:
        if self.embedded is not None:
            self.embedded.stop()

    def _sql(self, statement: str, url: str | None = None) -> list[asyncpg.Record]:
        async def run() -> list[asyncpg.Record]:
            conn = await asyncpg.connect(url or self.admin_url)
            try:
                return list(await conn.fetch(statement))
            finally:
                await conn.close()

        return asyncio.run(run())

    def create_database(self, section: str) -> tuple[str, str]:
        name = f"imagegen_bench_{section}_{uuid.uuid4().hex[:8]}"
        self._sql(f'CREATE DATABASE "{name}"')
        url = _with_database(self.admin_url, name)
        asyncio.run(migrate(url))
        return name, url

    def drop_database(self, name: str) -> None:
        self._sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def postgres_info(self) -> dict[str, Any]:
        rows = self._sql(
            "SELECT name, setting, unit FROM pg_settings WHERE name IN "
            "('fsync', 'synchronous_commit', 'shared_buffers', 'max_connections', 'wal_level', 'work_mem')"
        )
        version = self._sql("SELECT version()")[0][0]
        return {
            "version": version,
            "server": "DATABASE_URL" if self.embedded is None else "embedded (pgserver), .data/bench-postgres",
            "settings": {r["name"]: f"{r['setting']}{r['unit'] or ''}" for r in rows},
        }

    def loadgen(self, task: dict[str, Any], timeout: float = 900.0) -> dict[str, Any]:
        """Runs one load generator task in its own process; adds the CPU it used."""
        output = self.run_dir / f"loadgen-{uuid.uuid4().hex[:8]}.json"
        task = {**task, "output": str(output)}
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.monotonic()
        done = subprocess.run(
            [sys.executable, "-m", "bench.loadgen"],
            input=json.dumps(task).encode(),
            capture_output=True,
            cwd=ROOT,
            env=clean_env({}),
            timeout=timeout,
            check=False,
        )
        wall = time.monotonic() - started
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if done.returncode != 0:
            raise RuntimeError(f"load generator failed ({task['task']}):\n{done.stderr.decode()[-4000:]}")
        result: dict[str, Any] = json.loads(output.read_text())
        output.unlink()
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        result["loadgen_cpu_percent"] = round(100.0 * cpu / wall, 1) if wall > 0 else math.nan
        return result

    # -- one section's processes ------------------------------------------------------------------

    @contextmanager
    def stack(
        self, section: str, *, job_env: dict[str, str] | None = None, warm: list[list[str]] | None = None
    ) -> Iterator[Stack]:
        db_name, db_url = self.create_database(section)
        folder = self.run_dir / section
        folder.mkdir(parents=True, exist_ok=True)
        storage = self.storage_root / section
        stack = Stack(section, folder, db_name)
        try:
            provider = Proc(
                "provider",
                "bench.provider",
                [json.dumps({"models": self.latencies, "warm": warm or [["1:1", "1K"]]})],
                {},
                folder / "provider.log",
            ).start(announce=True)
            stack.provider = provider
            provider_port = provider.announced["port"]
            gen_port = free_port()
            gen_env = {
                "GEN_HOST": "127.0.0.1",
                "GEN_PORT": str(gen_port),
                "GEN_LOG_FORMAT": "json",
                "GEN_GEMINI_API_KEY": "bench-key",
                "GEN_GEMINI_BASE_URL": f"http://127.0.0.1:{provider_port}",
                "GEN_MODELS": json.dumps(self.models),
                "GEN_STORAGE_BACKEND": "local",
                "GEN_STORAGE_DIR": str(storage),
                "GEN_STORAGE_HTTP_HOST": "127.0.0.1",
                "GEN_STORAGE_HTTP_PORT": "0",
                "GEN_PROVIDER_READ_TIMEOUT_SECONDS": "120",
                "GEN_SHUTDOWN_GRACE_SECONDS": "2",
                **self.options.generator_env,
            }
            for i in range(self.options.generator_replicas):
                env = {**gen_env, "GEN_LOOP_LAG_FILE": str(folder / f"generator-{i}.lag.json")}
                stack.generators.append(
                    Proc(f"generator-{i}", "generator_service", [], env, folder / f"generator-{i}.log")
                )
            for proc in stack.generators:
                proc.start()
            for proc in stack.generators:
                proc.wait_for_log("generator serving")
            job_port = free_port()
            base_job_env = {
                "DATABASE_URL": db_url,
                "JOB_HOST": "127.0.0.1",
                "JOB_PORT": str(job_port),
                "JOB_GENERATOR_TARGET": f"127.0.0.1:{gen_port}",
                "JOB_MIGRATE_ON_START": "false",
                "JOB_LOG_FORMAT": "json",
                "JOB_JWT_SECRET": DEV_JWT_SECRET,
                "JOB_DEFAULT_MODEL": "bench-zero",
                # Quotas out of the way: the system is what is measured.
                "JOB_ACTIVE_JOBS_PER_USER": "1000000",
                "JOB_NEW_USER_CREDITS": "0",
                "JOB_SHUTDOWN_GRACE_SECONDS": "2",
                **(job_env or {}),
                **self.options.job_env,
            }
            for i in range(self.options.job_replicas):
                env = {**base_job_env, "JOB_LOOP_LAG_FILE": str(folder / f"job-{i}.lag.json")}
                stack.jobs.append(Proc(f"job-{i}", "job_service", ["serve"], env, folder / f"job-{i}.log"))
            for proc in stack.jobs:
                proc.start()
            for proc in stack.jobs:
                proc.wait_for_log("job service serving")
            stack.job_target = f"127.0.0.1:{job_port}"
            stack.provider_url = f"http://127.0.0.1:{provider_port}"
            stack.settings = {
                "job_replicas": self.options.job_replicas,
                "generator_replicas": self.options.generator_replicas,
                "job_env": {k: v for k, v in base_job_env.items() if k not in ("DATABASE_URL", "JOB_JWT_SECRET")},
                "generator_env": {k: v for k, v in gen_env.items() if k not in ("GEN_GEMINI_API_KEY",)},
                "storage": str(storage),
            }
            self.settings_used[section] = stack.settings
            time.sleep(0.5)  # let the loop-lag files appear
            yield stack
        finally:
            for proc in [*stack.jobs, *stack.generators]:
                proc.stop()
            if stack.provider is not None:
                stack.provider.stop()
            with _quiet():
                self.drop_database(db_name)
            shutil.rmtree(storage, ignore_errors=True)

    # -- sections ------------------------------------------------------------------------------------

    def grant_credits(self, stack: Stack) -> None:
        self.loadgen(
            {
                "task": "grant",
                "target": stack.job_target,
                "service_token": self.service_token,
                "user_ids": self.user_ids,
                "amount": 1_000_000_000,
            }
        )

    def _unary_task(self, kind: str, target: str, **extra: Any) -> dict[str, Any]:
        return {
            "kind": kind,
            "target": target,
            "tokens": self.tokens,
            "model": "bench-zero",
            "channels": self.scale.channels,
            "warmup": self.scale.warmup_seconds,
            "run": uuid.uuid4().hex[:8],
            **extra,
        }

    def _unary_runs(self, kind: str, target: str, stack: Stack | None, echo: Proc | None = None) -> dict[str, Any]:
        closed = []
        for concurrency in self.scale.concurrencies:
            window = stack.window() if stack else None
            echo_cpu = echo.cpu_seconds() if echo else 0.0
            profiler = (
                self.profiler(stack, f"{kind}-closed-{concurrency}", self.scale.closed_seconds)
                if stack and concurrency == max(self.scale.concurrencies)
                else None
            )
            result = self.loadgen(
                {
                    "task": "closed",
                    **self._unary_task(kind, target, concurrency=concurrency, duration=self.scale.closed_seconds),
                }
            )
            entry = {
                "concurrency": concurrency,
                "calls_per_second": round(result["calls_per_second"], 1),
                "latency_ms": stats.summary(result["latencies_ms"]),
                "errors": result["errors"],
                "loadgen_cpu_percent": result["loadgen_cpu_percent"],
            }
            if window is not None:
                entry["cpu_ms_per_call"] = window.cpu_per(result["calls_total"])
            if echo is not None:
                used = echo.cpu_seconds() - echo_cpu
                entry["cpu_ms_per_call"] = {"echo": round(1000.0 * used / max(1, result["calls_total"]), 3)}
            self.finish_profile(profiler, f"{kind}-closed-{concurrency}")
            closed.append(entry)
        window = stack.window() if stack else None
        profiler = self.profiler(stack, f"{kind}-open", self.scale.open_seconds) if stack else None
        opened = self.loadgen(
            {
                "task": "open",
                **self._unary_task(kind, target, rate=self.scale.open_rate, duration=self.scale.open_seconds),
            }
        )
        open_entry = {
            "offered_per_second": self.scale.open_rate,
            "achieved_send_rate": round(opened["achieved_send_rate"], 1),
            "latency_ms": stats.summary(opened["latencies_ms"]),
            "latency_from_send_ms": stats.summary(opened["latencies_from_send_ms"]),
            "errors": opened["errors"],
            "dropped": opened["dropped"],
            "loadgen_cpu_percent": opened["loadgen_cpu_percent"],
        }
        self.finish_profile(profiler, f"{kind}-open")
        if window is not None:
            open_entry["cpu_ms_per_call"] = window.cpu_per(opened["calls_total"])
            open_entry["loop_lag"] = window.lag()
        best = max(closed, key=lambda e: e["calls_per_second"])
        return {"closed_loop": closed, "best_calls_per_second": best["calls_per_second"], "open_loop": open_entry}

    def section_ceiling(self) -> dict[str, Any]:
        folder = self.run_dir / "ceiling"
        folder.mkdir(parents=True, exist_ok=True)
        echo = Proc("echo", "bench.echo", [str(free_port())], {}, folder / "echo.log").start(announce=True)
        try:
            target = f"127.0.0.1:{echo.announced['port']}"
            result = self._unary_runs("echo", target, None, echo)
            result["peak_rss_mb"] = round(echo.peak_rss_mb(), 1)
            return result
        finally:
            echo.stop()

    def section_create_job(self) -> dict[str, Any]:
        # The dispatcher claims nothing (max in flight 0): this section measures the API path alone;
        # the e2e sections measure creating and running jobs together.
        with self.stack("create_job", job_env={"JOB_MAX_IN_FLIGHT": "0"}) as stack:
            self.grant_credits(stack)
            result = self._unary_runs("create", stack.job_target, stack)
            result["users"] = len(self.user_ids)
            result["services"] = stack.final()
            return result

    def warm_up(self, stack: Stack) -> None:
        """A few jobs one after another through fresh services, so that the first measured ones do not pay
        for first-time work (statements prepared per pooled connection, first calls, first writes): with 100
        jobs the slowest one decides the p99, and it used to be the first to complete."""
        self.loadgen(
            {
                "task": "e2e_latency",
                "target": stack.job_target,
                "tokens": self.tokens,
                "model": "bench-zero",
                "warmup_jobs": self.scale.warmup_jobs,
                "count": 0,
                "run": uuid.uuid4().hex[:8],
            }
        )

    def section_e2e(self) -> dict[str, Any]:
        with self.stack("e2e") as stack:
            self.grant_credits(stack)
            window = stack.window()
            # About 20 ms per job one at a time: the profile covers most of the run.
            profiler = self.profiler(stack, "e2e-sequential", max(2.0, self.scale.e2e_latency_jobs * 0.015))
            latency = self.loadgen(
                {
                    "task": "e2e_latency",
                    "target": stack.job_target,
                    "tokens": self.tokens,
                    "model": "bench-zero",
                    "count": self.scale.e2e_latency_jobs,
                    "run": uuid.uuid4().hex[:8],
                }
            )
            self.finish_profile(profiler, "e2e-sequential")
            latency_window = window.cpu_per(self.scale.e2e_latency_jobs)
            window = stack.window()
            profiler = self.profiler(stack, "e2e-burst", max(3.0, self.scale.e2e_burst_jobs / 100))
            burst = self.loadgen(
                {
                    "task": "burst",
                    "target": stack.job_target,
                    "tokens": self.tokens,
                    "model": "bench-zero",
                    "count": self.scale.e2e_burst_jobs,
                    "channels": self.scale.channels,
                    "run": uuid.uuid4().hex[:8],
                    "timeout": self.scale.job_timeout,
                }
            )
            self.finish_profile(profiler, "e2e-burst")
            elapsed = burst["last_ended_at"] - burst["started_at"]
            completed = burst["states"].get("completed", 0)
            return {
                "images_per_job": 4,
                "image": "1024x1024 PNG (the smallest size the generator accepts for 1:1), about 5.5 kB",
                "sequential": {
                    "jobs": self.scale.e2e_latency_jobs,
                    "latency_ms": stats.summary(latency["latencies_ms"]),
                    "states": latency["states"],
                    "cpu_ms_per_job": latency_window,
                },
                "burst": {
                    "jobs": self.scale.e2e_burst_jobs,
                    "completed": completed,
                    "states": burst["states"],
                    "errors": burst["errors"],
                    "error_samples": burst.get("error_samples", {}),
                    "seconds": round(elapsed, 3),
                    "completed_per_second": round(completed / elapsed, 1) if elapsed > 0 else math.nan,
                    "submit_seconds": round(burst["all_created_at"] - burst["started_at"], 3),
                    "latency_ms": stats.summary(burst["latencies_ms"]),
                    "cpu_ms_per_job": window.cpu_per(completed),
                    "loop_lag": window.lag(),
                    "loadgen_cpu_percent": burst["loadgen_cpu_percent"],
                },
                "services": stack.final(),
            }

    def section_capacity(self) -> dict[str, Any]:
        jobs = self.scale.capacity_jobs
        job_env = {"JOB_MAX_IN_FLIGHT": str(max(256, jobs + jobs // 4))}
        with self.stack("capacity", job_env=job_env) as stack:
            self.grant_credits(stack)
            window = stack.window()
            profiler = self.profiler(stack, "capacity", self.scale.capacity_latency[1])
            burst = self.loadgen(
                {
                    "task": "burst",
                    "target": stack.job_target,
                    "tokens": self.tokens,
                    "model": "bench-inflight",
                    "count": jobs,
                    "channels": self.scale.channels,
                    "run": uuid.uuid4().hex[:8],
                    "timeout": self.scale.job_timeout,
                }
            )
            self.finish_profile(profiler, "capacity")
            lag = window.lag()
            provider_stats = stack.provider_stats()
            total = burst["last_ended_at"] - burst["started_at"]
            submit = burst["all_created_at"] - burst["started_at"]
            longest = provider_stats["max_latency_seconds"]
            bound = longest + submit
            return {
                "jobs": jobs,
                "provider_latency_seconds": list(self.scale.capacity_latency),
                "completed": burst["states"].get("completed", 0),
                "states": burst["states"],
                "errors": burst["errors"],
                "error_samples": burst.get("error_samples", {}),
                "total_seconds": round(total, 3),
                "submit_seconds": round(submit, 3),
                "longest_provider_latency_seconds": round(longest, 3),
                "overhead_over_bound_percent": round(100.0 * (total - bound) / bound, 2) if bound > 0 else math.nan,
                "provider_peak_concurrent_requests": provider_stats["peak_in_flight"],
                "loop_lag": lag,
                "cpu_ms_per_job": window.cpu_per(burst["states"].get("completed", 0)),
                "services": stack.final(),
                "loadgen_cpu_percent": burst["loadgen_cpu_percent"],
            }

    def section_burst_2k(self) -> dict[str, Any]:
        with self.stack("burst_2k", warm=[["1:1", "2K"]]) as stack:
            self.grant_credits(stack)
            window = stack.window()
            burst = self.loadgen(
                {
                    "task": "burst",
                    "target": stack.job_target,
                    "tokens": self.tokens,
                    "model": "bench-2k",
                    "image_size": "2K",
                    "count": self.scale.big_jobs,
                    "channels": self.scale.channels,
                    "run": uuid.uuid4().hex[:8],
                    "timeout": self.scale.job_timeout,
                }
            )
            from bench.images import image_bytes

            image_size = len(image_bytes(2048, 2048, 0))
            return {
                "jobs": self.scale.big_jobs,
                "images_per_job": 4,
                "image": f"2048x2048 PNG with noise, {image_size / 1e6:.1f} MB each (about a real 2K Imagen PNG)",
                "provider_latency_seconds": list(self.scale.big_latency),
                "completed": burst["states"].get("completed", 0),
                "states": burst["states"],
                "errors": burst["errors"],
                "error_samples": burst.get("error_samples", {}),
                "total_seconds": round(burst["last_ended_at"] - burst["started_at"], 3),
                "cpu_ms_per_job": window.cpu_per(burst["states"].get("completed", 0)),
                "loop_lag": window.lag(),
                "services": stack.final(),
            }

    def section_fanout(self) -> dict[str, Any]:
        with self.stack("fanout") as stack:
            self.grant_credits(stack)
            self.warm_up(stack)
            window = stack.window()
            profiler = self.profiler(stack, "fanout", self.scale.fanout_latency[1] + 2)
            prefix = f"fanout-{uuid.uuid4().hex[:8]}"
            result = self.loadgen(
                {
                    "task": "fanout",
                    "target": stack.job_target,
                    "tokens": self.tokens,
                    "model": "bench-fanout",
                    "jobs": self.scale.fanout_jobs,
                    "watchers": self.scale.fanout_watchers,
                    "channels": self.scale.channels,
                    "prompt_prefix": prefix,
                    "run": uuid.uuid4().hex[:8],
                    "timeout": self.scale.job_timeout,
                }
            )
            self.finish_profile(profiler, "fanout")
            sent = stack.provider_sent()
            image_stored: list[float] = []
            completed: list[float] = []
            late = missing = 0
            for prompt, watchers in result["records"].items():
                at = sent.get(prompt)
                for record in watchers:
                    if at is None or record["completed"] is None:
                        missing += 1
                        continue
                    if record["subscribed"] is None or record["subscribed"] > at:
                        late += 1  # subscribed after the change: it saw it in its snapshot, not as an event
                        continue
                    if record["image_stored"] is not None:
                        image_stored.append((record["image_stored"] - at) * 1000.0)
                    completed.append((record["completed"] - at) * 1000.0)
            return {
                "jobs": self.scale.fanout_jobs,
                "warmup_jobs": self.scale.warmup_jobs,
                "watchers_per_job": self.scale.fanout_watchers,
                "streams": self.scale.fanout_jobs * self.scale.fanout_watchers,
                "provider_latency_seconds": list(self.scale.fanout_latency),
                "first_image_stored_ms": stats.summary(image_stored),
                "completed_ms": stats.summary(completed),
                "subscribed_too_late": late,
                "missing": missing,
                "errors": result["errors"],
                "cpu_ms_per_job": window.cpu_per(self.scale.fanout_jobs),
                "loop_lag": window.lag(),
                "services": stack.final(),
                "loadgen_cpu_percent": result["loadgen_cpu_percent"],
            }

    # -- the whole run ----------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        started = time.time()
        load_before = machine_load()
        self.start_database()
        try:
            results: dict[str, Any] = {
                "schema": 1,
                "run_id": self.run_id,
                "scale": asdict(self.scale),
                "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
                "machine": machine_info(),
                "versions": versions(self.postgres_info()),
                "sections": {},
            }
            for section in self.options.sections:
                print(f"[bench] {section} ...", file=sys.stderr, flush=True)
                t0 = time.monotonic()
                results["sections"][section] = getattr(self, f"section_{section}")()
                results["sections"][section]["section_seconds"] = round(time.monotonic() - t0, 1)
            results["settings"] = {
                "job_replicas": self.options.job_replicas,
                "generator_replicas": self.options.generator_replicas,
                "users": len(self.user_ids),
                "credits_per_user": 1_000_000_000,
                "load_generator": f"one process (bench.loadgen), uvloop + grpc.aio, {self.scale.channels} channels",
                "per_section": self.settings_used,
            }
            results["machine"]["load_before"] = load_before
            results["machine"]["load_after"] = machine_load()
            if self.profiles:
                results["profiles"] = self.profiles
            results["duration_seconds"] = round(time.time() - started, 1)
            results["targets"] = evaluate_targets(results["sections"])
            return results
        finally:
            self.stop_database()
            shutil.rmtree(self.storage_root, ignore_errors=True)
            if not self.options.keep_logs:
                shutil.rmtree(self.run_dir, ignore_errors=True)


@dataclass
class Window:
    """CPU and loop lag of a stack's processes from the moment it was opened."""

    stack: Stack
    cpu: dict[str, float]
    started: float = field(default_factory=time.monotonic)
    lag_start: dict[str, Any] = field(init=False)

    def __post_init__(self) -> None:
        self.lag_start = self.stack.lag_snapshot()

    def cpu_per(self, units: int) -> dict[str, float]:
        now = self.stack.cpu()
        wall = time.monotonic() - self.started
        out = {}
        for name, value in now.items():
            used = value - self.cpu.get(name, 0.0)
            out[name] = round(1000.0 * used / units, 3) if units else math.nan
        out["wall_seconds"] = round(wall, 3)
        return out

    def lag(self) -> dict[str, Any]:
        return self.stack.lag_since(self.lag_start)


@dataclass
class Stack:
    section: str
    folder: Path
    database: str
    provider: Proc | None = None
    generators: list[Proc] = field(default_factory=list)
    jobs: list[Proc] = field(default_factory=list)
    job_target: str = ""
    provider_url: str = ""
    settings: dict[str, Any] = field(default_factory=dict)

    def services(self) -> list[Proc]:
        return [*self.jobs, *self.generators]

    def cpu(self) -> dict[str, float]:
        out = {p.name: p.cpu_seconds() for p in self.services()}
        out["jobs_total"] = sum(out[p.name] for p in self.jobs)
        out["postgres"] = postgres_backends_cpu(self.database)
        if self.provider is not None:
            out["provider"] = self.provider.cpu_seconds()
        return out

    def window(self) -> Window:
        return Window(self, self.cpu())

    def lag_snapshot(self) -> dict[str, Any]:
        return {p.name: stats.read_lag(self.folder / f"{p.name}.lag.json") for p in self.services()}

    def lag_since(self, start: dict[str, Any]) -> dict[str, Any]:
        time.sleep(1.1)  # one more write of every lag file, covering the end of the window
        now = self.lag_snapshot()
        return {name: stats.lag_window(start.get(name), now[name]) for name in now}

    def final(self) -> dict[str, Any]:
        return {
            p.name: {"peak_rss_mb": round(p.peak_rss_mb(), 1), "rss_mb": round(p.rss_mb(), 1)} for p in self.services()
        }

    def _get(self, path: str) -> Any:
        with urllib.request.urlopen(self.provider_url + path, timeout=30) as response:
            return json.loads(response.read())

    def provider_stats(self) -> dict[str, Any]:
        result: dict[str, Any] = self._get("/bench/stats")
        return result

    def provider_sent(self) -> dict[str, float]:
        result: dict[str, float] = self._get("/bench/sent")
        return result


@contextmanager
def _quiet() -> Iterator[None]:
    try:
        yield
    except Exception as exc:  # cleanup must not hide the result
        print(f"[bench] cleanup: {exc}", file=sys.stderr)


def machine_info() -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu_count": os.cpu_count(),
        "cpu_model": model,
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "kernel": platform.release(),
        "platform": platform.platform(),
    }


def versions(postgres: dict[str, Any]) -> dict[str, Any]:
    from importlib.metadata import version

    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT, check=False
    ).stdout.strip() or os.environ.get("BENCH_COMMIT", "")  # an exported tree has no .git: say which it is
    return {
        "python": platform.python_version(),
        "grpcio": version("grpcio"),
        "asyncpg": version("asyncpg"),
        "uvloop": version("uvloop"),
        "protobuf": version("protobuf"),
        "httpx": version("httpx"),
        "postgres": postgres,
        "imagegen_commit": commit,
    }


def evaluate_targets(sections: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, each with the figure reached and whether it was met."""
    targets: list[dict[str, Any]] = []

    def add(section: str, name: str, value: Any, target: str, met: bool, unit: str = "") -> None:
        targets.append({"section": section, "name": name, "value": value, "unit": unit, "target": target, "met": met})

    ceiling = sections.get("ceiling")
    create = sections.get("create_job")
    if create:
        best = create["best_calls_per_second"]
        if ceiling:
            share = 100.0 * best / ceiling["best_calls_per_second"]
            add("create_job", "CreateJob best calls/s vs echo best", round(share, 1), ">= 50 %", share >= 50.0, "%")
        p99 = create["open_loop"]["latency_ms"]["p99"]
        rate = create["open_loop"]["offered_per_second"]
        add("create_job", f"CreateJob p99 at {rate:g}/s offered", p99, "<= 10 ms", p99 <= 10.0, "ms")
    e2e = sections.get("e2e")
    if e2e:
        lat = e2e["sequential"]["latency_ms"]
        add("e2e", "e2e overhead p50 (CreateJob return -> COMPLETED)", lat["p50"], "<= 8 ms", lat["p50"] <= 8.0, "ms")
        add("e2e", "e2e overhead p99", lat["p99"], "<= 25 ms", lat["p99"] <= 25.0, "ms")
        rate = e2e["burst"]["completed_per_second"]
        add(
            "e2e", f"completed jobs/s, {e2e['burst']['jobs']} submitted at once", rate, ">= 400 /s", rate >= 400.0, "/s"
        )
    cap = sections.get("capacity")
    if cap:
        add(
            "capacity",
            f"{cap['jobs']} in flight: completed",
            f"{cap['completed']}/{cap['jobs']}",
            "all",
            cap["completed"] == cap["jobs"],
        )
        over = cap["overhead_over_bound_percent"]
        add("capacity", "total time over (longest provider latency + submit)", over, "<= 10 %", over <= 10.0, "%")
        for name, svc in cap["services"].items():
            add("capacity", f"peak RSS {name}", svc["peak_rss_mb"], "< 200 MB", svc["peak_rss_mb"] < 200.0, "MB")
        for name, lag in cap["loop_lag"].items():
            add("capacity", f"loop lag p99 {name}", lag["p99_ms"], "< 50 ms", lag["p99_ms"] < 50.0, "ms")
    big = sections.get("burst_2k")
    if big:
        add(
            "burst_2k",
            f"2K burst, {big['jobs']} jobs x 4 x 2K: completed",
            f"{big['completed']}/{big['jobs']}",
            "all",
            big["completed"] == big["jobs"],
        )
        for name, svc in big["services"].items():
            add(
                "burst_2k",
                f"2K burst peak RSS {name}",
                svc["peak_rss_mb"],
                "< 600 MB",
                svc["peak_rss_mb"] < 600.0,
                "MB",
            )
    fan = sections.get("fanout")
    if fan:
        p99 = fan["completed_ms"]["p99"]
        add("fanout", f"fan-out p99, COMPLETED to {fan['streams']} watchers", p99, "< 20 ms", p99 < 20.0, "ms")
        p99 = fan["first_image_stored_ms"]["p99"]
        add("fanout", "fan-out p99, first IMAGE_STORED", p99, "< 20 ms", p99 < 20.0, "ms")
    return targets
