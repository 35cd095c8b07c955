"""imagegen_common."""
