"""job_service."""
