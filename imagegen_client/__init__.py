"""Client library and CLI for imagegen's JobService."""

from imagegen_client.client import ImageGenClient, JobTimeoutError, RetryPolicy, TlsOptions, inline_image, job_image
from imagegen_client.sync_client import ImageGenSyncClient

__all__ = [
    "ImageGenClient",
    "ImageGenSyncClient",
    "JobTimeoutError",
    "RetryPolicy",
    "TlsOptions",
    "inline_image",
    "job_image",
]
