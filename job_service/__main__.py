"""`python -m job_service [serve|migrate]`: run the JobService, or only apply the migrations."""

from __future__ import annotations

from imagegen_common import cli_extras

cli_extras.keep_out()  # before anything imports httpx or structlog

import asyncio  # noqa: E402
import sys  # noqa: E402

import uvloop  # noqa: E402

from imagegen_common.logs import configure_logging  # noqa: E402
from job_service.config import ConfigurationError, JobSettings  # noqa: E402
from job_service.server import DatabaseUnreachable, migrate_when_reachable, resolve_database_url, serve  # noqa: E402


def main() -> None:
    command = sys.argv[1] if len(sys.argv) > 1 else "serve"
    settings = JobSettings()
    configure_logging("job_service", settings.log_format, settings.log_level)
    if command == "serve":
        try:
            uvloop.run(serve(settings))
        except ConfigurationError as error:
            sys.exit(f"job_service: {error}")
    elif command == "migrate":
        dsn, _embedded = resolve_database_url(settings)
        try:
            applied = asyncio.run(migrate_when_reachable(dsn, settings.migrate_wait_seconds))
        except DatabaseUnreachable as error:
            sys.exit(f"job_service migrate: {error}")
        print(f"applied {len(applied)} migration(s): {', '.join(applied) or 'none needed'}")
    else:
        sys.exit(f"usage: python -m job_service [serve|migrate] (got {command!r})")


if __name__ == "__main__":
    main()
