"""A Vertex AI model Google serves only at other locations than GEN_VERTEX_LOCATION is left out of ListModels, with
a log line naming the setting (generator_service/served_models.py)."""

from __future__ import annotations

from pathlib import Path

from imagegen.generator.v1 import generator_service_pb2 as pb
from structlog.testing import capture_logs

from generator_service.config import _default_models
from generator_service.served_models import served_models
from tests.generator.helpers import running, settings_for

GLOBAL_ONLY = {
    "vertex/gemini-3-pro-image-preview",
    "vertex/gemini-3.1-flash-image-preview",
    "vertex/gemini-3.1-flash-lite-image",
}


async def listed(tmp_path: Path, **settings: object) -> set[str]:
    async with running(settings_for(tmp_path, vertex_project="proj-1", **settings)) as (_app, stub):
        reply = await stub.ListModels(pb.ListModelsRequest())
    return {m.id for m in reply.models}


async def test_a_global_only_model_is_not_listed_at_a_region_and_the_log_names_the_setting(tmp_path: Path) -> None:
    with capture_logs() as logs:
        models = await listed(tmp_path, vertex_location="us-central1")

    assert not GLOBAL_ONLY & models
    assert {"vertex/gemini-3-pro-image", "imagen-4.0-generate-001"} <= models
    left_out = {e["model"]: e for e in logs if e.get("setting") == "GEN_VERTEX_LOCATION"}
    assert set(left_out) == GLOBAL_ONLY
    assert left_out["vertex/gemini-3-pro-image-preview"]["served_at"] == ["global"]
    assert left_out["vertex/gemini-3-pro-image-preview"]["log_level"] == "warning"


async def test_at_global_the_global_only_models_are_listed(tmp_path: Path) -> None:
    models = await listed(tmp_path, vertex_location="global")
    assert models >= GLOBAL_ONLY


def test_the_location_rule_touches_only_vertex_models() -> None:
    models = _default_models()
    providers = {"gemini-image": object(), "vertex-gemini-image": object()}

    served = served_models(models, providers, "europe-west4")

    # The Gemini API has no locations: its previews stay listed; Vertex's global-only ones do not.
    assert "gemini-3-pro-image-preview" in served
    assert "vertex/gemini-3-pro-image-preview" not in served
    assert "vertex/gemini-2.5-flash-image" in served
