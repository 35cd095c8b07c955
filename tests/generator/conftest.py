"""Fixtures for the generator tests: fake Google image APIs and a fake Supabase Storage on 127.0.0.1."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.generator.fake_google import FakeGeminiImage, FakeGeminiImagen, FakeVertexGeminiImage, FakeVertexImagen
from tests.generator.fake_supabase import FakeSupabaseStorage


@pytest.fixture
async def vertex_api() -> AsyncIterator[FakeVertexImagen]:
    fake = FakeVertexImagen()
    await fake.start()
    yield fake
    await fake.stop()


@pytest.fixture
async def gemini_imagen_api() -> AsyncIterator[FakeGeminiImagen]:
    fake = FakeGeminiImagen()
    await fake.start()
    yield fake
    await fake.stop()


@pytest.fixture
async def gemini_image_api() -> AsyncIterator[FakeGeminiImage]:
    fake = FakeGeminiImage()
    await fake.start()
    yield fake
    await fake.stop()


@pytest.fixture
async def vertex_gemini_image_api() -> AsyncIterator[FakeVertexGeminiImage]:
    fake = FakeVertexGeminiImage()
    await fake.start()
    yield fake
    await fake.stop()


@pytest.fixture
async def supabase_storage_api() -> AsyncIterator[FakeSupabaseStorage]:
    fake = FakeSupabaseStorage()
    await fake.start()
    yield fake
    await fake.stop()
