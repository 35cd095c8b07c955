"""Imagen 4 on Vertex AI: `:predict` under a project and location, with an OAuth token from ADC."""

from __future__ import annotations

from collections.abc import AsyncGenerator

from generator_service.config import ModelSpec
from generator_service.domain import FilteredImage, GeneratedImage, GenerationRequest
from generator_service.providers import predict
from generator_service.providers.google_auth import BearerTokenAuth, TokenSource
from generator_service.providers.http import ProviderHttp
from generator_service.providers.images import DEFAULT_MAX_PIXELS


def vertex_base_url(location: str) -> str:
    """Vertex AI's host for a location: regional `{location}-aiplatform.googleapis.com`, the multi-regions `us` and
    `eu` at `aiplatform.{us|eu}.rep.googleapis.com`, and `global` at `aiplatform.googleapis.com` (Google's
    "Deployments and endpoints" and "Regional and multiregional API endpoints" pages, checked 2026-12-06)."""
    if location == "global":
        return "https://aiplatform.googleapis.com"
    if location in ("us", "eu"):
        return f"https://aiplatform.{location}.rep.googleapis.com"
    return f"https://{location}-aiplatform.googleapis.com"


def vertex_models_url(project: str, location: str, base_url: str | None = None) -> str:
    """The collection Google's models live under: `{host}/v1/projects/{p}/locations/{l}/publishers/google/models`."""
    host = (base_url or vertex_base_url(location)).rstrip("/")
    return f"{host}/v1/projects/{project}/locations/{location}/publishers/google/models"


class VertexImagenProvider:
    name = "vertex-imagen"

    def __init__(
        self,
        http: ProviderHttp,
        tokens: TokenSource,
        *,
        project: str,
        location: str,
        base_url: str | None = None,
        jpeg_quality: int = 90,
        max_image_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        self._http = http
        self._tokens = tokens
        self._auth = BearerTokenAuth(tokens)
        self._models_url = vertex_models_url(project, location, base_url)
        self._jpeg_quality = jpeg_quality
        self._max_image_pixels = max_image_pixels

    def predict_url(self, model: ModelSpec) -> str:
        return f"{self._models_url}/{model.api_model}:predict"

    def generate(
        self, request: GenerationRequest, model: ModelSpec
    ) -> AsyncGenerator[GeneratedImage | FilteredImage, None]:
        return predict.generate(
            self._http,
            self.predict_url(model),
            self._auth,
            request,
            model,
            provider=self.name,
            jpeg_quality=self._jpeg_quality,
            max_pixels=self._max_image_pixels,
        )

    async def aclose(self) -> None:
        await self._http.aclose()
        await self._tokens.aclose()
