"""Client library and CLI for imagegen's JobService."""

from imagegen_client.client import ImageGenClient, JobTimeoutError, RetryPolicy

__all__ = ["ImageGenClient", "JobTimeoutError", "RetryPolicy"]
