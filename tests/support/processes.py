"""The services as real OS processes, for end-to-end, chaos and drain tests."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def health_status(target: str, timeout: float = 1.0) -> int | None:
    """The overall grpc.health.v1 status of a server, or None when it does not answer."""
    with grpc.insecure_channel(target) as channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout)
        except grpc.RpcError:
            return None
        return int(response.status)


@dataclass
class ServiceProcess:
    """`python -m <module> [args]` with extra environment; output goes to a log file for post-mortems."""

    module: str
    env: dict[str, str]
    log_path: Path
    args: list[str] = field(default_factory=list)
    port: int = 0
    process: subprocess.Popen[bytes] | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> ServiceProcess:
        # Faulthandler: a process that dies of a signal leaves its Python stack in the log.
        env = {**os.environ, **self.env, "PYTHONUNBUFFERED": "1", "PYTHONFAULTHANDLER": "1"}
        env.pop("DATABASE_URL", None) if "DATABASE_URL" not in self.env else None
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", self.module, *self.args],
            env=env,
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.module} exited with {self.process.returncode}:\n{self.log_tail()}")
            if health_status(self.target) == health_pb2.HealthCheckResponse.SERVING:
                return self
            time.sleep(0.1)
        raise TimeoutError(f"{self.module} did not become healthy:\n{self.log_tail()}")

    def log_entries(self) -> list[dict[str, Any]]:
        """The JSON lines of the log (LOG_FORMAT=json), parsed."""
        text = self.log_path.read_text(errors="replace")
        return [json.loads(line) for line in text.splitlines() if line.startswith("{")]

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def terminate(self, timeout: float = 90.0) -> int:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait()

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None


def generator_process(tmp: Path, name: str = "generator", **env: str) -> ServiceProcess:
    port = free_port()
    values = {
        "GEN_HOST": "127.0.0.1",
        "GEN_PORT": str(port),
        "GEN_STORAGE_DIR": str(tmp / "storage"),
        "GEN_STORAGE_HTTP_PORT": str(free_port()),
        "GEN_LOG_FORMAT": "json",
        **env,
    }
    return ServiceProcess("generator_service", values, tmp / f"{name}.log", port=port)


def job_process(tmp: Path, database_url: str, generator_target: str, name: str = "job", **env: str) -> ServiceProcess:
    port = free_port()
    values = {
        "DATABASE_URL": database_url,
        "JOB_HOST": "127.0.0.1",
        "JOB_PORT": str(port),
        "JOB_GENERATOR_TARGET": generator_target,
        "JOB_MIGRATE_ON_START": "false",
        "JOB_POLL_INTERVAL_SECONDS": "0.2",
        "JOB_LOG_FORMAT": "json",
        **env,
    }
    return ServiceProcess("job_service", values, tmp / f"{name}.log", args=["serve"], port=port)
