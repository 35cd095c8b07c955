"""`make bench` in its quickest form against the real services: every section runs and reports sane figures.

No thresholds on speed (the machine may be shared): only that every figure is there, positive and finite,
and that no job was lost on the way.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
TINY = [
    "--quick",
    *("--set", "concurrencies=1,16", "--set", "closed_seconds=0.5", "--set", "warmup_seconds=0.2"),
    *("--set", "open_rate=100", "--set", "open_seconds=0.5", "--set", "users=8"),
    *("--set", "e2e_latency_jobs=5", "--set", "e2e_burst_jobs=10"),
    *("--set", "capacity_jobs=10", "--set", "capacity_latency=0.3,0.6"),
    *("--set", "fanout_jobs=2", "--set", "fanout_watchers=3", "--set", "fanout_latency=1.0,1.2"),
]


def positive(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def test_quick_bench_reports_every_section_with_sane_figures(tmp_path: Path) -> None:
    output = tmp_path / "latest.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench", *TINY, "--output", str(output)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=170,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    results = json.loads(output.read_text())
    assert output.with_suffix(".md").read_text().count("|") > 20  # the Markdown table
    sections = results["sections"]
    assert set(sections) == {"ceiling", "create_job", "e2e", "capacity", "burst_2k", "fanout"}
    for key in ("cpu_count", "memory_gib"):
        assert positive(results["machine"][key])
    assert results["versions"]["postgres"]["version"].startswith("PostgreSQL")
    assert results["targets"] and all(isinstance(t["met"], bool) for t in results["targets"])

    for name in ("ceiling", "create_job"):
        section = sections[name]
        assert [e["concurrency"] for e in section["closed_loop"]] == [1, 16]
        for entry in section["closed_loop"]:
            assert positive(entry["calls_per_second"]), (name, entry)
            assert positive(entry["latency_ms"]["p99"]), (name, entry)
            assert not entry["errors"], (name, entry)
        latency = section["open_loop"]["latency_ms"]
        assert positive(latency["p50"]) and positive(latency["p99"]), (name, latency)
        assert not section["open_loop"]["errors"], name

    e2e = sections["e2e"]
    assert e2e["sequential"]["states"] == {"completed": 5}
    assert positive(e2e["sequential"]["latency_ms"]["p50"]) and positive(e2e["sequential"]["latency_ms"]["p99"])
    assert e2e["burst"]["completed"] == 10 and not e2e["burst"]["errors"]
    assert positive(e2e["burst"]["completed_per_second"])

    for name, jobs in (("capacity", 10), ("burst_2k", 2)):
        section = sections[name]
        assert section["completed"] == jobs and not section["errors"], (name, section["states"], section["errors"])
        assert positive(section["total_seconds"])
        assert {"job-0", "generator-0"} <= set(section["services"])
        for service in section["services"].values():
            assert positive(service["peak_rss_mb"]), (name, service)
        for lag in section["loop_lag"].values():
            assert lag["samples"] > 0 and positive(lag["p99_ms"]), (name, lag)

    fanout = sections["fanout"]
    assert fanout["missing"] == 0 and not fanout["errors"]
    assert fanout["completed_ms"]["count"] + fanout["subscribed_too_late"] == 6
    if fanout["completed_ms"]["count"]:
        assert positive(fanout["completed_ms"]["p50"]) and positive(fanout["completed_ms"]["p99"])
