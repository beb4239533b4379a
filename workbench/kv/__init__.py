"""Head-aware KV-cache policies (issue 32)."""
