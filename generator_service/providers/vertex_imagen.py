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
    # The "global" location has no regional host.
    host = "aiplatform.googleapis.com" if location == "global" else f"{location}-aiplatform.googleapis.com"
    return f"https://{host}"


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
        self._models_url = (
            f"{(base_url or vertex_base_url(location)).rstrip('/')}"
            f"/v1/projects/{project}/locations/{location}/publishers/google/models"
        )
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
