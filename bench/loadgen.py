"""The load generator: its own process (`python -m bench.loadgen`), so its CPU is not the services' CPU.

It reads one task as JSON on stdin, runs it on uvloop with grpc.aio, and writes the result as JSON to the
file the task names. Timestamps that are compared with other processes are `time.time()` (same machine, same clock);
durations inside this process are `time.perf_counter()`.

Unary calls go out as pre-serialised bytes and come back as bytes, for the echo ceiling and CreateJob
alike, so both measurements pay the same client-side cost. Calls are spread round-robin over several
channels with their own TCP connections, so that several server processes sharing a port
(SO_REUSEPORT) all get work.
"""

from __future__ import annotations

import asyncio
import collections
import gc
import itertools
import json
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import grpc
import uvloop
from imagegen.job.v1 import job_service_pb2 as pb
from imagegen.job.v1 import job_service_pb2_grpc as pb_grpc

from bench.echo import METHOD as ECHO_METHOD

CREATE_METHOD = "/imagegen.job.v1.JobService/CreateJob"
TERMINAL = (pb.JOB_STATE_COMPLETED, pb.JOB_STATE_FAILED, pb.JOB_STATE_CANCELLED, pb.JOB_STATE_EXPIRED)
STATE_NAMES: dict[int, str] = {int(v): k.removeprefix("JOB_STATE_").lower() for k, v in pb.JobState.items()}


def make_channels(target: str, count: int) -> list[grpc.aio.Channel]:
    options = [
        ("grpc.use_local_subchannel_pool", 1),  # one TCP connection per channel, not one shared
        ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ]
    return [grpc.aio.insecure_channel(target, options=options) for _ in range(count)]


def metadata(tokens: list[str]) -> list[tuple[tuple[str, str], ...]]:
    return [(("authorization", f"Bearer {token}"),) for token in tokens]


def create_request(task: dict[str, Any], i: int, prompt: str | None = None) -> pb.CreateJobRequest:
    return pb.CreateJobRequest(
        prompt=prompt or f"bench job {i}: a lighthouse on a cliff at dusk",
        model=task["model"],
        params=pb.GenerationParams(sample_count=task.get("sample_count", 4), image_size=task.get("image_size", "")),
        request_id=f"{task.get('run', 'r')}-{i}",
    )


class UnaryCaller:
    """`call(i)`: the i-th call of a closed or open loop, as bytes, round-robin over channels and tokens."""

    def __init__(self, task: dict[str, Any]) -> None:
        self.task = task
        self.channels = make_channels(task["target"], task.get("channels", 8))
        method = ECHO_METHOD if task["kind"] == "echo" else CREATE_METHOD
        self.rpcs: list[Any] = [ch.unary_unary(method) for ch in self.channels]
        self.metadata = metadata(task["tokens"])
        self.timeout = float(task.get("timeout", 30.0))

    def request(self, i: int) -> bytes:
        # The same bytes for both kinds: the echo server gets exactly what CreateJob would.
        return create_request(self.task, i).SerializeToString()

    async def call(self, i: int) -> None:
        rpc = self.rpcs[i % len(self.rpcs)]
        await rpc(self.request(i), metadata=self.metadata[i % len(self.metadata)], timeout=self.timeout)

    async def close(self) -> None:
        await asyncio.gather(*(ch.close() for ch in self.channels))


ERROR_SAMPLES: dict[str, str] = {}  # the first message seen for each error code, for the results


def _code(error: BaseException) -> str:
    code = error.code().name if isinstance(error, grpc.aio.AioRpcError) else type(error).__name__
    if code not in ERROR_SAMPLES:
        details = error.details() if isinstance(error, grpc.aio.AioRpcError) else str(error)
        ERROR_SAMPLES[code] = (details or "")[:300]
    return code


async def closed_loop(task: dict[str, Any]) -> dict[str, Any]:
    """`concurrency` callers, each calling again as soon as its call returns, for warmup + duration seconds."""
    caller = UnaryCaller(task)
    counter = itertools.count()
    latencies: list[float] = []
    errors: collections.Counter[str] = collections.Counter()
    start = time.perf_counter()
    measure_from = start + float(task.get("warmup", 1.0))
    end = measure_from + float(task["duration"])
    completed_in_window = 0

    async def worker() -> None:
        nonlocal completed_in_window
        while (t0 := time.perf_counter()) < end:
            try:
                await caller.call(next(counter))
                ok = True
            except Exception as exc:
                ok = False
                errors[_code(exc)] += 1
            t1 = time.perf_counter()
            if t0 >= measure_from and ok:
                latencies.append((t1 - t0) * 1000.0)
            if measure_from <= t1 <= end and ok:
                completed_in_window += 1

    await asyncio.gather(*(worker() for _ in range(int(task["concurrency"]))))
    await caller.close()
    return {
        "concurrency": task["concurrency"],
        "seconds": task["duration"],
        "calls": completed_in_window,
        "calls_total": next(counter),
        "calls_per_second": completed_in_window / float(task["duration"]),
        "latencies_ms": latencies,
        "errors": dict(errors),
    }


async def open_loop(task: dict[str, Any]) -> dict[str, Any]:
    """Calls sent on a fixed schedule (`rate` per second) whether or not earlier ones returned.

    Latency is counted from when a call was due, not from when it went out, so a stalled server is not
    hidden by a load generator that waits for it (coordinated omission); the time from actual send is
    reported too.
    """
    caller = UnaryCaller(task)
    rate = float(task["rate"])
    warmup = float(task.get("warmup", 1.0))
    total = int((warmup + float(task["duration"])) * rate)
    max_outstanding = int(task.get("max_outstanding", 20_000))
    from_due: list[float] = []
    from_send: list[float] = []
    errors: collections.Counter[str] = collections.Counter()
    outstanding: set[asyncio.Task[None]] = set()
    dropped = 0
    start = time.perf_counter()
    measure_from = start + warmup

    async def one(i: int, due: float) -> None:
        sent = time.perf_counter()
        try:
            await caller.call(i)
        except Exception as exc:
            errors[_code(exc)] += 1
            return
        done = time.perf_counter()
        if due >= measure_from:
            from_due.append((done - due) * 1000.0)
            from_send.append((done - sent) * 1000.0)

    for i in range(total):
        due = start + i / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if len(outstanding) >= max_outstanding:
            dropped += 1
            continue
        t = asyncio.create_task(one(i, due))
        outstanding.add(t)
        t.add_done_callback(outstanding.discard)
    sent_all = time.perf_counter()
    if outstanding:
        await asyncio.wait(outstanding)
    await caller.close()
    return {
        "rate": rate,
        "seconds": task["duration"],
        "achieved_send_rate": total / (sent_all - start),
        "calls_total": total - dropped,
        "latencies_ms": from_due,
        "latencies_from_send_ms": from_send,
        "errors": dict(errors),
        "dropped": dropped,
    }


class JobCalls:
    """Typed JobService calls (protobuf), for the tasks that follow jobs."""

    def __init__(self, task: dict[str, Any]) -> None:
        self.task = task
        self.channels = make_channels(task["target"], task.get("channels", 8))
        self.stubs = [pb_grpc.JobServiceStub(ch) for ch in self.channels]
        self.metadata = metadata(task["tokens"])

    async def create(self, i: int, prompt: str | None = None) -> pb.Job:
        stub = self.stubs[i % len(self.stubs)]
        md = self.metadata[i % len(self.metadata)]
        for attempt in range(5):
            try:
                response = await stub.CreateJob(create_request(self.task, i, prompt), metadata=md, timeout=60.0)
                return response.job
            except grpc.aio.AioRpcError as error:
                # Only an overloaded or restarting server is worth a retry (request_id makes it safe).
                if error.code() != grpc.StatusCode.UNAVAILABLE or attempt == 4:
                    raise
                await asyncio.sleep(0.2 * (attempt + 1))
        raise AssertionError("unreachable")

    async def follow(
        self,
        i: int,
        job_id: str,
        on_update: Callable[[pb.WatchJobResponse, float], bool] | None = None,
        channel: int | None = None,
    ) -> tuple[int, float]:
        """Watches job `i` (created with token i) until a terminal state; returns (state, unix time it arrived)."""
        stub = self.stubs[(i if channel is None else channel) % len(self.stubs)]
        md = self.metadata[i % len(self.metadata)]  # the owner's token: anyone else gets NOT_FOUND
        stream = stub.WatchJob(pb.WatchJobRequest(job_id=job_id), metadata=md)
        try:
            async for update in stream:
                now = time.time()
                if on_update is not None and on_update(update, now):
                    return update.job.state, now
                state = update.event.state if update.HasField("event") else update.job.state
                if state in TERMINAL:
                    return state, now
        finally:
            stream.cancel()
        raise RuntimeError(f"the watch of {job_id} ended before a terminal state")

    async def close(self) -> None:
        await asyncio.gather(*(ch.close() for ch in self.channels))


async def e2e_latency(task: dict[str, Any]) -> dict[str, Any]:
    """One job at a time: CreateJob's return -> its terminal state at a watcher, with nothing else running."""
    calls = JobCalls(task)
    latencies: list[float] = []
    states: collections.Counter[str] = collections.Counter()
    for i in range(int(task.get("warmup_jobs", 5)) + int(task["count"])):
        job = await calls.create(i)
        returned = time.time()
        state, arrived = await calls.follow(i, job.id)
        if i >= int(task.get("warmup_jobs", 5)):
            latencies.append((arrived - returned) * 1000.0)
            states[STATE_NAMES[state]] += 1
    await calls.close()
    return {"latencies_ms": latencies, "states": dict(states)}


async def burst(task: dict[str, Any]) -> dict[str, Any]:
    """`count` jobs submitted at once, each followed by a watcher until it ends."""
    calls = JobCalls(task)
    count = int(task["count"])
    created_at: list[float] = []
    ended_at: list[float] = []
    latencies: list[float] = []
    states: collections.Counter[str] = collections.Counter()
    errors: collections.Counter[str] = collections.Counter()
    started = time.time()

    async def one(i: int) -> None:
        try:
            job = await calls.create(i)
            returned = time.time()
            created_at.append(returned)
            state, arrived = await asyncio.wait_for(calls.follow(i, job.id), float(task.get("timeout", 300.0)))
        except Exception as exc:
            errors[_code(exc)] += 1
            return
        ended_at.append(arrived)
        latencies.append((arrived - returned) * 1000.0)
        states[STATE_NAMES[state]] += 1

    await asyncio.gather(*(one(i) for i in range(count)))
    await calls.close()
    return {
        "count": count,
        "started_at": started,
        "all_created_at": max(created_at, default=started),
        "last_ended_at": max(ended_at, default=started),
        "latencies_ms": latencies,
        "states": dict(states),
        "errors": dict(errors),
    }


async def fanout(task: dict[str, Any]) -> dict[str, Any]:
    """`jobs` jobs with `watchers` WatchJob streams each; records when each stream saw each event arrive."""
    calls = JobCalls(task)
    per_job = int(task["watchers"])
    records: dict[str, list[dict[str, float | None]]] = {}
    errors: collections.Counter[str] = collections.Counter()

    async def watcher(j: int, w: int, job_id: str, record: dict[str, float | None]) -> None:
        def seen(update: pb.WatchJobResponse, now: float) -> bool:
            if not update.HasField("event"):
                record["subscribed"] = now
                return False
            if update.event.type == pb.JOB_EVENT_TYPE_IMAGE_STORED and record["image_stored"] is None:
                record["image_stored"] = now
            elif update.event.type == pb.JOB_EVENT_TYPE_COMPLETED:
                record["completed"] = now
            return False

        try:
            watching = calls.follow(j, job_id, seen, channel=j * per_job + w)
            await asyncio.wait_for(watching, float(task.get("timeout", 120.0)))
        except Exception as exc:
            errors[_code(exc)] += 1

    async def job(j: int) -> None:
        prompt = f"{task['prompt_prefix']}-{j}"
        try:
            created = await calls.create(j, prompt)
        except Exception as exc:
            errors[_code(exc)] += 1
            return
        mine = records[prompt] = [{"subscribed": None, "image_stored": None, "completed": None} for _ in range(per_job)]
        await asyncio.gather(*(watcher(j, w, created.id, mine[w]) for w in range(per_job)))

    await asyncio.gather(*(job(j) for j in range(int(task["jobs"]))))
    await calls.close()
    return {"records": records, "errors": dict(errors)}


async def grant(task: dict[str, Any]) -> dict[str, Any]:
    """Gives every user credits through the service-role GrantCredits (which also opens their account)."""
    channel = make_channels(task["target"], 1)[0]
    stub = pb_grpc.JobServiceStub(channel)
    md = (("authorization", f"Bearer {task['service_token']}"),)
    slots = asyncio.Semaphore(32)

    async def one(user_id: str) -> None:
        async with slots:
            await stub.GrantCredits(
                pb.GrantCreditsRequest(user_id=user_id, amount=int(task["amount"]), reason="bench"),
                metadata=md,
                timeout=30.0,
            )

    await asyncio.gather(*(one(u) for u in task["user_ids"]))
    await channel.close()
    return {"granted": len(task["user_ids"])}


TASKS: dict[str, Callable[[dict[str, Any]], Coroutine[Any, Any, dict[str, Any]]]] = {
    "closed": closed_loop,
    "open": open_loop,
    "e2e_latency": e2e_latency,
    "burst": burst,
    "fanout": fanout,
    "grant": grant,
}


def main() -> None:
    task = json.loads(sys.stdin.read())
    # As timeit does: no cycle collection while measuring. With 1,000 streams open a full collection here
    # took 20-40 ms, and it would have been counted as the services' latency. A task lasts seconds to a minute.
    gc.disable()
    result: dict[str, Any] = uvloop.run(TASKS[task["task"]](task))
    if ERROR_SAMPLES:
        result["error_samples"] = ERROR_SAMPLES
    # A file, not stdout: the event loop leaves stdout non-blocking, and a result larger than the pipe
    # buffer (64 kB of latencies) would be cut short whenever the reader is slower than the writer.
    Path(task["output"]).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
