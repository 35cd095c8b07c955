"""Processes the bench starts (provider, echo server, services), and what it reads about them from /proc."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil  # type: ignore[import-untyped]

ROOT = Path(__file__).resolve().parent.parent
# Settings the bench sets itself; inherited values of these would make a run depend on the caller's shell.
_INHERITED_PREFIXES = ("JOB_", "GEN_", "SUPABASE_", "IMAGEGEN_")


def free_port() -> int:
    """A free port below the kernel's ephemeral range.

    grpc binds with SO_REUSEPORT by default, so two servers that were both told "this port is free"
    (bind to port 0, then close) share it without an error and split each other's connections. Test
    suites running on the same machine pick their ports from the ephemeral range; the bench stays out of it.
    """
    low, _high = (int(x) for x in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    for _ in range(200):
        port = random.randint(max(1024, low - 12_000), low - 1)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise OSError("no free port below the ephemeral range")


def clean_env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(_INHERITED_PREFIXES) and k != "DATABASE_URL"}
    env.update(extra)
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONFAULTHANDLER"] = "1"  # a crash in native code (grpc, asyncpg) leaves a Python traceback in the log
    return env


def _status_kib(pid: int, key: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def cpu_seconds(pid: int) -> float:
    try:
        times = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return 0.0
    return float(times.user + times.system)


@dataclass
class Proc:
    """`python -m <module> [args]` with its own environment and log file."""

    name: str
    module: str
    args: list[str]
    env: dict[str, str]
    log_path: Path
    popen: subprocess.Popen[bytes] | None = None
    announced: dict[str, Any] = field(default_factory=dict)

    def start(self, *, announce: bool = False) -> Proc:
        """With `announce`, waits for the first stdout line (JSON, e.g. the port it bound)."""
        log = self.log_path.open("ab")
        self.popen = subprocess.Popen(
            [sys.executable, "-m", self.module, *self.args],
            env=clean_env(self.env),
            cwd=ROOT,
            stdout=subprocess.PIPE if announce else log,
            stderr=log,
        )
        if announce:
            assert self.popen.stdout is not None
            line = self.popen.stdout.readline()
            if not line:
                raise RuntimeError(f"{self.name} exited before starting:\n{self.log_tail()}")
            self.announced = json.loads(line)
        return self

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def wait_for_log(self, text: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"{self.name} exited:\n{self.log_tail()}")
            if text in self.log_path.read_text(errors="replace"):
                return
            time.sleep(0.05)
        raise TimeoutError(f"{self.name} did not log {text!r} in {timeout}s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def peak_rss_mb(self) -> float:
        return _status_kib(self.pid, "VmHWM") / 1024.0

    def rss_mb(self) -> float:
        return _status_kib(self.pid, "VmRSS") / 1024.0

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.pid)

    def stop(self, timeout: float = 20.0) -> None:
        if self.popen is None or self.popen.poll() is not None:
            return
        self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()


def postgres_backends_cpu(database: str) -> float:
    """CPU seconds used so far by the PostgreSQL backends connected to `database` (embedded or local)."""
    total = 0.0
    for process in psutil.process_iter(["name", "cmdline"]):
        try:
            cmdline = " ".join(process.info["cmdline"] or [])
            if process.info["name"] == "postgres" and f" {database} " in f" {cmdline} ":
                times = process.cpu_times()
                total += times.user + times.system
        except psutil.Error:
            continue
    return total


def machine_load() -> dict[str, Any]:
    """What else the machine is doing: load average and the busiest other processes right now."""
    me = {os.getpid(), *(c.pid for c in psutil.Process().children(recursive=True))}
    procs = list(psutil.process_iter(["pid", "name", "cmdline"]))
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.cpu_percent(None)
    time.sleep(0.5)
    busy = []
    for p in procs:
        try:
            if p.pid in me:
                continue
            percent = p.cpu_percent(None)
            if percent >= 5.0:
                busy.append({"pid": p.pid, "cpu_percent": percent, "cmd": " ".join(p.info["cmdline"] or [])[:100]})
        except psutil.Error:
            continue
    busy.sort(key=lambda b: -b["cpu_percent"])
    return {
        "loadavg": list(os.getloadavg()),
        "system_cpu_percent": psutil.cpu_percent(interval=None),
        "other_busy_processes": busy[:8],
    }


class Profiler:
    """py-spy (a dev dependency) sampling each process for a while; summarised as top functions."""

    def __init__(self, procs: list[Proc], seconds: float, folder: Path, label: str) -> None:
        self._procs = procs
        self._seconds = max(1, round(seconds))
        self._folder = folder
        self._label = label
        self._running: list[tuple[Proc, Path, subprocess.Popen[bytes]]] = []

    def start(self) -> Profiler:
        py_spy = Path(sys.executable).parent / "py-spy"
        if not py_spy.exists():
            raise RuntimeError("--profile needs py-spy (a dev dependency: make setup)")
        self._folder.mkdir(parents=True, exist_ok=True)
        for proc in self._procs:
            out = self._folder / f"{self._label}-{proc.name}.txt"
            command = [
                str(py_spy),
                "record",
                "-p",
                str(proc.pid),
                "-d",
                str(self._seconds),
                "-r",
                "200",
                "-f",
                "raw",
                "-o",
                str(out),
                "--nonblocking",
            ]
            popen = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            self._running.append((proc, out, popen))
        return self

    def finish(self) -> dict[str, Any]:
        summaries: dict[str, Any] = {}
        for proc, out, popen in self._running:
            try:
                popen.wait(self._seconds + 30)
            except subprocess.TimeoutExpired:
                popen.kill()
            summaries[proc.name] = summarise_collapsed(out) if out.exists() else {"error": "no profile written"}
        return summaries


def summarise_collapsed(path: Path, top: int = 15) -> dict[str, Any]:
    """Top functions by own samples and by samples with them on the stack, from py-spy's raw output."""
    own: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = [f.split(" (", 1)[0] + _where(f) for f in stack.split(";")]
        own[frames[-1]] = own.get(frames[-1], 0) + count
        for frame in set(frames):
            inclusive[frame] = inclusive.get(frame, 0) + count

    def ranked(table: dict[str, int]) -> list[tuple[str, float]]:
        return [(name, round(100.0 * n / total, 1)) for name, n in sorted(table.items(), key=lambda kv: -kv[1])[:top]]

    return {"samples": total, "own_percent": ranked(own), "inclusive_percent": ranked(inclusive), "file": str(path)}


def _where(frame: str) -> str:
    # "func (path/to/module.py:123)" -> " (module.py)": enough to tell functions apart, stable across lines.
    if " (" not in frame:
        return ""
    location = frame.split(" (", 1)[1].rstrip(")")
    return f" ({Path(location.rsplit(':', 1)[0]).name})"
