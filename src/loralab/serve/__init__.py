"""`loralab serve`: one base model and many adapters behind an OpenAI-compatible API."""
