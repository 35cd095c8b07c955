"""What JobService asks the generator for a job (GeneratorClient), without a generator."""

from __future__ import annotations

from job_service.domain import ModelInfo, Params
from job_service.generator_client import GeneratorClient
from tests.support.jobs import a_job

FLASH = ModelInfo("gemini-2.5-flash-image", ["1:1"], ["1K"], 4, [])
IMAGEN = ModelInfo("imagen-4.0-generate-001", ["1:1"], ["1K", "2K"], 4, ["dont_allow", "allow_adult", "allow_all"])


async def test_a_job_from_before_the_catalogue_keeps_running_on_a_model_without_person_generation() -> None:
    # Jobs created before CreateJob refused person_generation on such models carry the old default; the generator
    # now refuses it there, so it is not sent (the old generator dropped it too).
    client = GeneratorClient("127.0.0.1:1", token=None)
    try:
        client._models = {FLASH.id: FLASH, IMAGEN.id: IMAGEN}
        old = a_job(model=FLASH.id, params=Params(person_generation="allow_adult"))
        assert client._person_generation(old) == ""
        chosen = a_job(model=IMAGEN.id, params=Params(person_generation="dont_allow"))
        assert client._person_generation(chosen) == "dont_allow"
    finally:
        await client.close()
