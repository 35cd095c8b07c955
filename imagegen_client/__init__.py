"""imagegen_client."""
