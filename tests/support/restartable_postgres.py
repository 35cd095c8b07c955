"""A PostgreSQL server of a test's own (pgserver's binaries), which the test may stop and start again.

The session's shared server must never be restarted under other tests; this one has its own data
folder. Its unix-socket URL stays the same across restarts, like a real server's address.

Two things differ from pgserver's own helpers, both because a test process is multi-threaded (gRPC):
commands run as the server's user through `runuser` rather than subprocess's `user=`, which forks
the whole process (gRPC skips its fork handlers and the child can crash before exec); and the data
folder lives under the repository's .data/, because pytest resets /tmp/pytest-of-<user> to mode 0700
whenever a session starts (other engineers' too), which would lock the server's user out of tmp_path.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

from pgserver._commands import POSTGRES_BIN_PATH

ROOT = Path(__file__).resolve().parents[2]


class RestartablePostgres:
    def __init__(self) -> None:
        self.data_dir = ROOT / ".data" / f"pg-restart-{uuid.uuid4().hex[:8]}"
        self.data_dir.mkdir(parents=True)
        self._user: str | None = None
        if os.geteuid() == 0:  # PostgreSQL refuses to run as root: pgserver's own user runs it
            from pgserver.utils import ensure_prefix_permissions, ensure_user_exists

            self._user = "pgserver"
            entry = ensure_user_exists(self._user)
            assert entry is not None
            ensure_prefix_permissions(self.data_dir)
            os.chown(self.data_dir, entry.pw_uid, entry.pw_gid)
        self._run("initdb", "-D", str(self.data_dir), "--auth=trust", "--encoding=utf8", "-U", "postgres")
        self.start()

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres:@/{database}?host={self.data_dir}"

    def start(self) -> None:
        self._run(
            "pg_ctl", "-D", str(self.data_dir), "-w", "-o", '-h ""', "-o", f"-k {self.data_dir}",
            "-l", str(self.data_dir / "log"), "start",
        )  # fmt: skip

    def stop(self, mode: str = "fast") -> None:
        """pg_ctl stop: "fast" ends every session (57P01) as a restart or failover does; "immediate" is a crash."""
        self._run("pg_ctl", "-D", str(self.data_dir), "-w", "-m", mode, "stop")

    def close(self) -> None:
        if (self.data_dir / "postmaster.pid").exists():
            self.stop("immediate")
        shutil.rmtree(self.data_dir, ignore_errors=True)

    def _run(self, program: str, *args: str) -> None:
        command = [str(POSTGRES_BIN_PATH / program), *args]
        if self._user:
            command = ["runuser", "-u", self._user, "--", *command]
        # Output to a file, not a pipe: the server pg_ctl starts inherits it and would hold a pipe open.
        with tempfile.TemporaryFile("w+") as output:
            result = subprocess.run(command, stdout=output, stderr=subprocess.STDOUT, timeout=120, check=False)
            if result.returncode != 0:
                output.seek(0)
                raise RuntimeError(f"{program} failed ({result.returncode}): {output.read()}")
