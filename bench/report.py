"""The results as a table: rich on the terminal, Markdown for bench/README.md (and the project README)."""

from __future__ import annotations

import math
import sys
from typing import Any

from rich.console import Console
from rich.table import Table

Row = tuple[str, str, str, str]  # figure, result, target, met


def _fmt(value: Any, unit: str = "") -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        text = f"{value:,.0f}" if abs(value) >= 100 else f"{value:,.1f}" if abs(value) >= 10 else f"{value:,.2f}"
    else:
        text = str(value)
    return f"{text} {unit}".strip()


def _pair(summary: dict[str, Any], unit: str = "ms") -> str:
    return f"{_fmt(summary['p50'])} / {_fmt(summary['p99'])} {unit}"


def _info(section: str, sections: dict[str, Any]) -> list[Row]:
    """Figures without a target that explain the ones with one."""
    data = sections[section]
    out: list[Row] = []
    if section == "ceiling":
        for e in data["closed_loop"]:
            out.append((f"echo ceiling, {e['concurrency']} in flight", _fmt(e["calls_per_second"], "calls/s"), "", ""))
        o = data["open_loop"]
        out.append((f"echo p50 / p99 at {o['offered_per_second']:g}/s offered", _pair(o["latency_ms"]), "", ""))
    elif section == "create_job":
        echo = {e["concurrency"]: e["calls_per_second"] for e in sections.get("ceiling", {}).get("closed_loop", [])}
        for e in data["closed_loop"]:
            share = (
                f" ({100 * e['calls_per_second'] / echo[e['concurrency']]:.0f} % of echo)"
                if echo.get(e["concurrency"])
                else ""
            )
            out.append(
                (f"CreateJob, {e['concurrency']} in flight", _fmt(e["calls_per_second"], "calls/s") + share, "", "")
            )
        o = data["open_loop"]
        out.append(
            (f"CreateJob p50 at {o['offered_per_second']:g}/s offered", _fmt(o["latency_ms"]["p50"], "ms"), "", "")
        )
    elif section == "e2e":
        out.append(("e2e, one job at a time: p50 / p99", _pair(data["sequential"]["latency_ms"]), "", ""))
        out.append(
            (
                f"e2e, {data['burst']['jobs']} at once: create -> COMPLETED p50 / p99",
                _pair(data["burst"]["latency_ms"]),
                "",
                "",
            )
        )
    elif section == "capacity":
        out.append(
            (
                "in flight: total / submit / longest provider latency",
                f"{_fmt(data['total_seconds'])} / {_fmt(data['submit_seconds'])} / "
                f"{_fmt(data['longest_provider_latency_seconds'])} s",
                "",
                "",
            )
        )
    elif section == "burst_2k":
        out.append(("2K burst: total time", _fmt(data["total_seconds"], "s"), "", ""))
    elif section == "fanout":
        out.append(
            (
                "fan-out p50, COMPLETED / first IMAGE_STORED",
                f"{_fmt(data['completed_ms']['p50'])} / {_fmt(data['first_image_stored_ms']['p50'])} ms",
                "",
                "",
            )
        )
    return out


def rows(results: dict[str, Any]) -> list[Row]:
    sections = results["sections"]
    out: list[Row] = []
    for section in sections:
        out += _info(section, sections)
        for t in results.get("targets", []):
            if t["section"] == section:
                out.append((t["name"], _fmt(t["value"], t["unit"]), t["target"], "yes" if t["met"] else "NO"))
    return out


def print_table(results: dict[str, Any], console: Console | None = None) -> None:
    console = console or Console(width=None if sys.stdout.isatty() else 110)
    machine = results["machine"]
    table = Table(
        title=f"imagegen bench ({results['scale']['name']}): {machine['cpu_count']} x {machine['cpu_model']}, "
        f"{machine['memory_gib']} GiB, JobService replicas {results['settings']['job_replicas']}, "
        f"{results['duration_seconds']} s",
    )
    table.add_column("Figure")
    table.add_column("Result", justify="right")
    table.add_column("Target", justify="right")
    table.add_column("Met", justify="center")
    for figure, result, target, met in rows(results):
        style = "red" if met == "NO" else ("green" if met == "yes" else None)
        table.add_row(figure, result, target, met, style=style)
    console.print(table)


def markdown(results: dict[str, Any]) -> str:
    machine = results["machine"]
    load = machine.get("load_before", {}).get("loadavg", [math.nan])[0]
    lines = [
        f"Run {results['run_id']} ({results['scale']['name']}, {results['duration_seconds']} s) on "
        f"{machine['cpu_count']} x {machine['cpu_model']}, {machine['memory_gib']} GiB; load average at start "
        f"{load:.2f}; JobService replicas: {results['settings']['job_replicas']}.",
        "",
        "| Figure | Result | Target | Met |",
        "|---|---:|---:|:---:|",
    ]
    for figure, result, target, met in rows(results):
        lines.append(f"| {figure} | {result} | {target} | {met} |")
    return "\n".join(lines) + "\n"
