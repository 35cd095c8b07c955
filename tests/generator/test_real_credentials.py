"""Opt-in: generate and store real images with real credentials (skipped without them).

Runs once per configured provider:
- Vertex AI: GOOGLE_APPLICATION_CREDENTIALS (a service-account key file, or ADC from `gcloud auth
  application-default login` with the variable pointing at it) and GEN_VERTEX_PROJECT
  (optionally GEN_VERTEX_LOCATION); model imagen-4.0-fast-generate-001.
- Gemini API: GEN_GEMINI_API_KEY; model gemini-2.5-flash-image.
GEN_REAL_TEST_MODEL overrides the model. With GEN_SUPABASE_URL and GEN_SUPABASE_SERVICE_KEY (and
GEN_STORAGE_BUCKET, default "images", which must exist) the images go to Supabase Storage; otherwise to
local storage under the test's temporary folder. Each run costs a few cents at the provider.
"""

from __future__ import annotations

import io
import os
import uuid
from pathlib import Path

import grpc
import httpx
import pytest
from imagegen.generator.v1 import generator_service_pb2 as pb
from imagegen.generator.v1 import generator_service_pb2_grpc as pb_grpc
from PIL import Image

from generator_service.config import GeneratorSettings
from generator_service.server import start
from tests.generator.helpers import USER_ID

HAS_VERTEX = bool(os.environ.get("GOOGLE_APPLICATION_CREDENTIALS") and os.environ.get("GEN_VERTEX_PROJECT"))
HAS_GEMINI = bool(os.environ.get("GEN_GEMINI_API_KEY"))
HAS_SUPABASE = bool(os.environ.get("GEN_SUPABASE_URL") and os.environ.get("GEN_SUPABASE_SERVICE_KEY"))
SKIP_REASON = (
    "needs real credentials: GOOGLE_APPLICATION_CREDENTIALS and GEN_VERTEX_PROJECT, and/or "
    "GEN_GEMINI_API_KEY (optional: GEN_SUPABASE_URL, GEN_SUPABASE_SERVICE_KEY, GEN_STORAGE_BUCKET "
    "for real storage)"
)

CASES = [
    pytest.param(
        "imagen-4.0-fast-generate-001",
        marks=pytest.mark.skipif(not HAS_VERTEX, reason=SKIP_REASON),
        id="vertex",
    ),
    pytest.param("gemini-2.5-flash-image", marks=pytest.mark.skipif(not HAS_GEMINI, reason=SKIP_REASON), id="gemini"),
]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("model", CASES)
async def test_real_provider_generates_and_real_storage_serves_the_image(tmp_path: Path, model: str) -> None:
    settings = GeneratorSettings(  # everything else (keys, project, storage) comes from the environment
        host="127.0.0.1",
        port=0,
        storage_backend="supabase" if HAS_SUPABASE else "local",
        storage_dir=tmp_path / "storage",
        storage_http_host="127.0.0.1",
        storage_http_port=0,
        shutdown_grace_seconds=1.0,
    )
    model = os.environ.get("GEN_REAL_TEST_MODEL", model)
    app = await start(settings)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
            stub = pb_grpc.GeneratorServiceStub(channel)
            request = pb.GenerateRequest(
                job_id=str(uuid.uuid4()),
                attempt=1,
                user_id=USER_ID,
                model=model,
                sample_count=1,
                prompt="A watercolour painting of a red lighthouse on a rocky coast at dusk",
                aspect_ratio="16:9",
            )
            events = [event async for event in stub.Generate(request, timeout=240)]
    finally:
        await app.stop()

    completed = events[-1].completed
    assert completed.delivered_count + completed.filtered_count == 1
    stored = [e.image_stored for e in events if e.HasField("image_stored")]
    if not stored:
        pytest.skip(f"the provider filtered the test prompt: {list(completed.filtered_reasons)}")
    (image,) = stored
    async with httpx.AsyncClient(timeout=60) as client:
        fetched = await client.get(image.url)
    assert fetched.status_code == 200
    assert len(fetched.content) == image.size_bytes
    with Image.open(io.BytesIO(fetched.content)) as decoded:
        assert decoded.size == (image.width, image.height)
        assert decoded.width > decoded.height  # 16:9 was asked for
