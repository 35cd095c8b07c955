"""`python -m generator_service`: run the GeneratorService until SIGTERM/SIGINT."""

from __future__ import annotations

import uvloop

from generator_service.config import GeneratorSettings
from generator_service.server import serve
from imagegen_common.logs import configure_logging


def main() -> None:
    settings = GeneratorSettings()
    configure_logging("generator_service", settings.log_format, settings.log_level)
    uvloop.run(serve(settings))


if __name__ == "__main__":
    main()
