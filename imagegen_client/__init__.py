"""Client library and CLI for imagegen's JobService."""

from imagegen_client.client import ImageGenClient, JobTimeoutError, RetryPolicy, TlsOptions
from imagegen_client.sync_client import ImageGenSyncClient
from imagegen_client.webhooks import WebhookVerificationError, verify_webhook

__all__ = [
    "ImageGenClient",
    "ImageGenSyncClient",
    "JobTimeoutError",
    "RetryPolicy",
    "TlsOptions",
    "WebhookVerificationError",
    "verify_webhook",
]
