"""Benchmarks (``agentmem bench ...``); results are written to docs/benchmarks/."""
