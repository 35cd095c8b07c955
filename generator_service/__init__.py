"""generator_service."""
