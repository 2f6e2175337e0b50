"""The methods the quality benchmark compares, by name: how the base session is set up and how it
is compacted (``session.compact(ratio, **kwargs)``). Every method keeps the same number of entries.

The headline set (``HEADLINE``) is every policy a user can pick by name, at its defaults; the
``am-*`` and ``evict-*`` variants are ablations of Attention Matching that earlier reports used.
"""

from __future__ import annotations

# name -> (policy of the base session, compact() keyword arguments, description)
Method = tuple[dict | str, dict, str]

HEADLINE: dict[str, Method] = {
    "truncate": ("truncate", {}, "most recent tokens only"),
    "streaming": ("streaming", {}, "4 sinks + most recent tokens (StreamingLLM)"),
    "h2o": ("h2o", {}, "H2O: accumulated causal attention of the context's own queries + recent half"),
    "snapkv": ("snapkv", {}, "SnapKV: votes of the last 32 queries, max-pooled (kernel 7), window kept"),
    "kvzip": ("kvzip", {}, "KVzip-style: max attention from a repeat-prefill pass, global top-k over heads"),
    "am-uniform": ("am-halve-uniform", {}, "Attention Matching, repeat-prefill queries, uniform head budgets"),
    "am": ("am-halve", {}, "Attention Matching, repeat-prefill queries, global head budgets (the default)"),
    "am-fast": ("am-fast", {}, "AM preset: the last 256 queries read (no extra pass), smaller fits, global budgets"),
}
ABLATIONS: dict[str, Method] = {
    "window": ("streaming", {"method": "window"}, "4 sinks + most recent tokens (StreamingLLM)"),
    "am-omp": (
        {"name": "am-halve", "offline_head_budgets": "uniform", "selection": "omp", "omp_step": 8},
        {},
        "AM, OMP keys (8 per refit), repeat-prefill queries, uniform budgets",
    ),
    "am-onpolicy": (
        {"name": "am-halve", "offline_head_budgets": "uniform", "on_policy_groups": 3},
        {},
        "`am-uniform`, on-policy: queries recomputed for 3 layer groups in turn",
    ),
    "am-recent": ("am-halve-uniform", {"queries": "recent"}, "AM, queries of the last 128 tokens (free), uniform"),
    "am-context": (
        {"name": "am-halve", "offline_head_budgets": "uniform", "queries": "context", "query_buffer": 512},
        {"queries": "context"},
        "AM, a uniform sample of 512 of the context's own queries (free), uniform budgets",
    ),
    "evict-rp": (
        {"name": "am-halve", "offline_head_budgets": "uniform", "fit_beta": False, "fit_values": False},
        {},
        "AM's keys, uniform budgets, beta = 0 and copied values",
    ),
    "am-q2048": (
        {"name": "am-halve", "offline_head_budgets": "uniform", "query_cap": 2048},
        {},
        "`am-uniform` ranking keys with 2048 queries",
    ),
    "am-beta-only": (
        {"name": "am-halve", "offline_head_budgets": "uniform", "fit_values": False},
        {},
        "`am-uniform` with copied values",
    ),
    "am-weak-ridge": (
        {"name": "am-halve", "offline_head_budgets": "uniform", "ridge": 1e-3},
        {},
        "`am-uniform` with a weak pull of the values toward the copied ones",
    ),
    "am-random-fit": (
        {"name": "am-halve", "offline_head_budgets": "uniform", "span_selection": False},
        {},
        "`am-uniform` selecting chunk by chunk (uniform per chunk), fits on random queries",
    ),
    "am-profile": (
        {"name": "am-halve", "head_budgets": "profile", "offline_head_budgets": "profile"},
        {},
        "`am`, per-head shares from the calibrated profile",
    ),
    "am-global": ("am-halve", {}, "`am` (global head budgets), the name quality_budgets.md uses"),
    "am-mixed": (
        {"name": "am-halve", "head_budgets": "profile+global", "offline_head_budgets": "profile+global"},
        {},
        "`am`, mean of the profile and the global allocation",
    ),
    "evict-global": (
        {"name": "am-halve", "offline_head_budgets": "global", "fit_beta": False, "fit_values": False},
        {},
        "global allocation, AM's keys, beta = 0, copied values",
    ),
}
METHODS: dict[str, Method] = {**HEADLINE, **ABLATIONS}
ONLINE_POLICIES = ["truncate", "streaming", "h2o", "snapkv", "kvzip", "am-halve"]
