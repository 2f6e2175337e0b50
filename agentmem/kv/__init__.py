"""The KV cache: per-layer storage, the budgeted cache, the attention path that reads it, positions."""
