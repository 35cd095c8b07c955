"""Client library and CLI for imagegen's JobService."""

from imagegen_client.client import ImageGenClient, JobTimeoutError, RetryPolicy, TlsOptions, inline_image, job_image
from imagegen_client.sync_client import ImageGenSyncClient
from imagegen_client.webhooks import WebhookVerificationError, verify_webhook

__all__ = [
    "ImageGenClient",
    "ImageGenSyncClient",
    "JobTimeoutError",
    "RetryPolicy",
    "TlsOptions",
    "WebhookVerificationError",
    "inline_image",
    "job_image",
    "verify_webhook",
]
