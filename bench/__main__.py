"""`python -m bench` (`make bench`): every benchmark in one run; a table on the terminal, figures in JSON.

python -m bench                      # full run (a few minutes), writes bench/results/latest.json
python -m bench --quick              # smoke run with tiny counts (well under a minute)
python -m bench --sections e2e,fanout --job-replicas 2 --output /tmp/r.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from bench.report import markdown, print_table
from bench.runner import FULL, QUICK, RESULTS_DIR, SECTIONS, Bench, Options, Scale


def parse_args(argv: list[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny counts and short runs (smoke test)")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    parser.add_argument("--job-replicas", type=int, default=1, help="JobService processes sharing one port")
    parser.add_argument("--generator-replicas", type=int, default=1, help="GeneratorService processes")
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "latest.json", help="where the JSON goes")
    parser.add_argument("--keep-logs", action="store_true", help="keep service logs under .data/bench-runs/")
    parser.add_argument("--profile", action="store_true", help="py-spy every service during the main windows")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override one count of the scale, e.g. --set capacity_jobs=500 --set capacity_latency=5,10",
    )
    parser.add_argument(
        "--generator-env",
        action="append",
        default=[],
        metavar="GEN_X=VALUE",
        help="an extra GeneratorService setting for every section",
    )
    parser.add_argument(
        "--job-env",
        action="append",
        default=[],
        metavar="JOB_X=VALUE",
        help="an extra JobService setting for every section",
    )
    args = parser.parse_args(argv)
    sections = tuple(s.strip() for s in args.sections.split(",") if s.strip())
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        parser.error(f"unknown section(s) {unknown}; choose from {SECTIONS}")
    scale = QUICK if args.quick else FULL
    for item in args.set:
        name, _, value = item.partition("=")
        if name not in Scale.__dataclass_fields__ or name == "name":
            parser.error(f"--set: unknown field {name!r}; one of {sorted(Scale.__dataclass_fields__)}")
        current = getattr(scale, name)
        parsed: Any
        if isinstance(current, tuple):
            parsed = tuple(type(current[0])(v) for v in value.split(","))
        else:
            parsed = type(current)(value)
        scale = dataclasses.replace(scale, **{name: parsed})
    return Options(
        scale=scale,
        sections=sections,
        job_replicas=args.job_replicas,
        generator_replicas=args.generator_replicas,
        output=args.output,
        keep_logs=args.keep_logs or args.profile,
        profile=args.profile,
        generator_env=dict(item.split("=", 1) for item in args.generator_env),
        job_env=dict(item.split("=", 1) for item in args.job_env),
    )


def main(argv: list[str] | None = None) -> int:
    options = parse_args(argv)
    results = Bench(options).run()
    options.output.parent.mkdir(parents=True, exist_ok=True)
    temporary = options.output.with_name(options.output.name + ".tmp")
    temporary.write_text(json.dumps(results, indent=1, allow_nan=True) + "\n")
    temporary.replace(options.output)
    options.output.with_suffix(".md").write_text(markdown(results))
    print_table(results)
    print(f"figures: {options.output} (table: {options.output.with_suffix('.md')})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
