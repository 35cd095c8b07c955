"""`python -m generator_service`: run the GeneratorService until SIGTERM/SIGINT."""

from __future__ import annotations

from imagegen_common import cli_extras

cli_extras.keep_out()  # before anything imports httpx or structlog

import sys  # noqa: E402

import uvloop  # noqa: E402

from generator_service.config import ConfigurationError, GeneratorSettings  # noqa: E402
from generator_service.server import serve  # noqa: E402
from imagegen_common.logs import configure_logging  # noqa: E402


def main() -> None:
    settings = GeneratorSettings()
    configure_logging("generator_service", settings.log_format, settings.log_level)
    try:
        uvloop.run(serve(settings))
    except ConfigurationError as error:
        sys.exit(f"generator_service: {error}")


if __name__ == "__main__":
    main()
