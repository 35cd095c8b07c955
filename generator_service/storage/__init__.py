"""Object storage for generated images."""
