"""GeneratorService over gRPC: protobuf <-> domain, nothing else."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from imagegen.generator.v1 import generator_service_pb2 as pb
from imagegen.generator.v1 import generator_service_pb2_grpc as pb_grpc

from generator_service.domain import Completed, GenerationRequest, Started, Stored
from generator_service.generation import Generator
from imagegen_common.grpc_errors import stream_errors, unary_errors

DOMAIN = "imagegen.generator.v1"


def request_from_proto(request: pb.GenerateRequest) -> GenerationRequest:
    return GenerationRequest(
        job_id=request.job_id,
        attempt=request.attempt,
        user_id=request.user_id,
        prompt=request.prompt,
        model=request.model,
        sample_count=request.sample_count,
        aspect_ratio=request.aspect_ratio or "1:1",
        image_size=request.image_size or "1K",
        person_generation=request.person_generation or "allow_adult",
        output_mime_type=request.output_mime_type or "image/png",
    )


class GeneratorServicer(pb_grpc.GeneratorServiceServicer):
    def __init__(self, generator: Generator) -> None:
        self._generator = generator

    @stream_errors(DOMAIN)
    async def Generate(self, request: pb.GenerateRequest, context: Any) -> AsyncIterator[pb.GenerateResponse]:
        # aclosing: closing this stream closes the attempt (and its provider calls) at once, not at collection.
        async with contextlib.aclosing(self._generator.run(request_from_proto(request))) as events:
            async for event in events:
                match event:
                    case Started():
                        yield pb.GenerateResponse(
                            started=pb.GenerationStarted(provider=event.provider, model=event.model)
                        )
                    case Stored():
                        yield pb.GenerateResponse(
                            image_stored=pb.ImageStored(
                                index=event.index,
                                url=event.url,
                                storage_path=event.storage_path,
                                mime_type=event.mime_type,
                                width=event.width,
                                height=event.height,
                                size_bytes=event.size_bytes,
                            )
                        )
                    case Completed():
                        yield pb.GenerateResponse(
                            completed=pb.GenerationCompleted(
                                delivered_count=event.delivered_count,
                                filtered_count=event.filtered_count,
                                filtered_reasons=event.filtered_reasons,
                            )
                        )

    @unary_errors(DOMAIN)
    async def ListModels(self, request: pb.ListModelsRequest, context: Any) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(
            models=[
                pb.Model(
                    id=m.id,
                    provider=m.provider,
                    display_name=m.display_name,
                    aspect_ratios=m.aspect_ratios,
                    image_sizes=m.image_sizes,
                    max_sample_count=m.max_sample_count,
                    person_generation_options=m.person_generation_options,
                    provider_price_usd=m.provider_price_usd,
                )
                for m in self._generator.list_models()
            ]
        )
