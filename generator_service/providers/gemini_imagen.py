"""Imagen 4 on the Gemini API: the seed's `generativelanguage.googleapis.com/v1beta/models/{model}:predict`.

Google shut these models down on the Gemini API in 2026 (their ids answer 404; google-genai disabled
`generate_images` there on 2026-08-21). The provider stays for anyone whose key still reaches them, and
turns the 404 into an answer that says what happened and where to go instead.

Catalogue ids: the same Google model is also served by vertex-imagen under its plain id
(`imagen-4.0-generate-001`), so the Gemini API variants are listed as `gemini-api/<google id>` with
`ModelSpec.provider_model` holding the id sent on the wire (see config._default_models).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator

from generator_service.config import ModelSpec
from generator_service.domain import FilteredImage, GeneratedImage, GenerationRequest, generation_error
from generator_service.providers import predict
from generator_service.providers.http import ApiKeyAuth, HttpFailure, ProviderHttp
from generator_service.providers.images import DEFAULT_MAX_PIXELS
from imagegen_common.errors import ErrorKind, ServiceError

DEFAULT_BASE_URL = "https://generativelanguage.googleapis.com"


def model_not_served(model: ModelSpec, said: str) -> ServiceError:
    return generation_error(
        ErrorKind.NOT_FOUND,
        "MODEL_NOT_SERVED",
        f"{model.api_model} is no longer served: Google shut Imagen down on the Gemini API in 2026 "
        f"(the provider said: {said}). Use an Imagen model through vertex-imagen "
        "(e.g. imagen-4.0-generate-001, needs GEN_VERTEX_PROJECT) or a Gemini image model through "
        "gemini-image (e.g. gemini-2.5-flash-image).",
        retryable=False,
    )


class GeminiImagenProvider:
    name = "gemini-imagen"

    def __init__(
        self,
        http: ProviderHttp,
        api_key: str,
        *,
        base_url: str = DEFAULT_BASE_URL,
        jpeg_quality: int = 90,
        max_image_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        self._http = http
        self._auth = ApiKeyAuth(api_key)
        self._base = base_url.rstrip("/")
        self._jpeg_quality = jpeg_quality
        self._max_image_pixels = max_image_pixels

    def predict_url(self, model: ModelSpec) -> str:
        return f"{self._base}/v1beta/models/{model.api_model}:predict"

    def generate(
        self, request: GenerationRequest, model: ModelSpec
    ) -> AsyncGenerator[GeneratedImage | FilteredImage, None]:
        def on_failure(failure: HttpFailure) -> ServiceError:
            if failure.status == 404:
                return model_not_served(model, failure.message)
            return predict.error_for(failure, self.name, model.id)

        return predict.generate(
            self._http,
            self.predict_url(model),
            self._auth,
            request,
            model,
            provider=self.name,
            jpeg_quality=self._jpeg_quality,
            max_pixels=self._max_image_pixels,
            on_failure=on_failure,
        )

    async def aclose(self) -> None:
        await self._http.aclose()
