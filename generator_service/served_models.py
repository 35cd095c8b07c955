"""Which catalogued models this generator serves: those whose provider is configured and, on Vertex AI, that Google
serves at GEN_VERTEX_LOCATION.

A Vertex model served only at other locations (Gemini 3 Pro Image preview: `global` only) would answer every call
404 (MODEL_NOT_FOUND) after JobService had reserved credits and spent an attempt on it. It is left out of ListModels
instead, so CreateJob refuses it up front (UNKNOWN_MODEL), and the start log says which setting would serve it. Not a
refusal to start: the default catalogue holds both regional and global-only models, and an operator serving Imagen 4
in us-central1 must not be stopped by a Gemini model they may never use.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import structlog

from generator_service.config import ModelSpec

log = structlog.get_logger(__name__)

# The providers that call Vertex AI at GEN_VERTEX_LOCATION.
_VERTEX_PROVIDERS = frozenset({"vertex-imagen", "vertex-gemini-image"})


def served_models(
    models: Iterable[ModelSpec], providers: Mapping[str, object], vertex_location: str
) -> dict[str, ModelSpec]:
    """The models to serve, by id; each Vertex model left out for its location is logged once (a warning)."""
    served: dict[str, ModelSpec] = {}
    for model in models:
        if model.provider not in providers:
            continue
        if (
            model.provider in _VERTEX_PROVIDERS
            and model.vertex_locations
            and vertex_location not in model.vertex_locations
        ):
            log.warning(
                "model not served at this Vertex AI location: left out of ListModels",
                model=model.id,
                setting="GEN_VERTEX_LOCATION",
                location=vertex_location,
                served_at=model.vertex_locations,
            )
            continue
        served[model.id] = model
    return served
