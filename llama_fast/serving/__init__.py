"""The serving engine behind serve.py: the paged KV cache (paged_cache.py), continuous batching (engine.py), the OpenAI
API bodies (api.py)."""
