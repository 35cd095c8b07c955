"""The services' processes leave out what only the CLI needs (httpx's command line, rich)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest


@pytest.mark.parametrize(("service", "env"), [("job_service", "JOB_PORT"), ("generator_service", "GEN_PORT")])
def test_a_service_process_imports_its_stack_but_not_the_cli_extras(service: str, env: str) -> None:
    # An invalid port stops the service at its settings, after the entry point has imported everything.
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", service],
        env={**os.environ, env: "not-a-port"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0 and "ValidationError" in result.stderr
    imported = set(re.findall(r"^import time:\s+\d+ \|\s+\d+ \|\s*([\w.]+)$", result.stderr, re.MULTILINE))
    assert {"grpc", "structlog", "httpx"} <= imported, "the service's own stack is imported"
    # (the blocked imports themselves are listed, as attempts; what they would have pulled in is not)
    assert not imported & {"click", "pygments", "rich.console"}, "nothing only the CLI needs"
