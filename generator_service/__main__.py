"""`python -m generator_service [serve|serve-images]`: run the GeneratorService until SIGTERM/SIGINT, or only
the HTTP server of its local storage folder (one address for images that every replica writes; image_server)."""

from __future__ import annotations

from imagegen_common import cli_extras

cli_extras.keep_out()  # before anything imports httpx or structlog

import sys  # noqa: E402

import uvloop  # noqa: E402

from generator_service.config import ConfigurationError, GeneratorSettings  # noqa: E402
from generator_service.image_server import serve_images  # noqa: E402
from generator_service.server import serve  # noqa: E402
from imagegen_common.logs import configure_logging  # noqa: E402


def main() -> None:
    command = sys.argv[1] if len(sys.argv) > 1 else "serve"
    settings = GeneratorSettings()
    configure_logging("generator_service", settings.log_format, settings.log_level)
    try:
        if command == "serve":
            uvloop.run(serve(settings))
        elif command == "serve-images":
            uvloop.run(serve_images(settings))
        else:
            sys.exit(f"usage: python -m generator_service [serve|serve-images] (got {command!r})")
    except ConfigurationError as error:
        sys.exit(f"generator_service: {error}")


if __name__ == "__main__":
    main()
