"""Image providers: each turns a GenerationRequest into images (or filtered placeholders)."""
