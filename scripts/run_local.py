"""`make run`: embedded PostgreSQL, migrations, then both services in the foreground.

The embedded server is started here and handed to JobService as DATABASE_URL, so it stops when this
launcher exits (its data stays under IMAGEGEN_DATA_DIR). Ctrl-C or SIGTERM stops both services
gracefully, JobService first.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

from imagegen_common.embedded_postgres import EmbeddedPostgres
from imagegen_common.migrate import migrate


def main() -> int:
    env = dict(os.environ)
    embedded = None
    if not env.get("DATABASE_URL"):
        data_dir = Path(env.get("IMAGEGEN_DATA_DIR", ".data"))
        embedded = EmbeddedPostgres(data_dir / "postgres")
        env["DATABASE_URL"] = embedded.url()
        print(f"embedded PostgreSQL running, data in {data_dir / 'postgres'}", flush=True)
    applied = asyncio.run(migrate(env["DATABASE_URL"]))
    print(f"migrations: {', '.join(applied) or 'up to date'}", flush=True)

    generator = subprocess.Popen([sys.executable, "-m", "generator_service"], env=env)
    jobs = subprocess.Popen(
        [sys.executable, "-m", "job_service", "serve"], env={**env, "JOB_MIGRATE_ON_START": "false"}
    )
    stopping = False

    def stop(_signum: int, _frame: object) -> None:
        nonlocal stopping
        if not stopping:
            stopping = True
            jobs.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    while jobs.poll() is None and generator.poll() is None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            jobs.wait(timeout=0.5)
    stop(0, None)
    jobs.wait()
    generator.send_signal(signal.SIGTERM)
    generator.wait()
    if embedded:
        embedded.stop()
    return max(jobs.returncode or 0, generator.returncode or 0)


if __name__ == "__main__":
    sys.exit(main())
