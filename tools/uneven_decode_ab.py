"""Decode over heads of different sizes, measured inside decoding: time per layer call of each path.

A session reads the first N tokens of argparse.py, compacts them to half with global head budgets
(heads of different lengths: ``attention._per_head_decode`` runs for every layer of every decode
step), then generates 16-token stretches, switching the path between stretches: ``flat`` (one
product over all of a layer's slots while it has at most ``FLAT_DECODE_SLOTS``) and ``heads``
(products per KV head everywhere). Same session and cache for both, so the caches' memory state
is what decoding sees; prints medians of microseconds per layer call and their ratio.

    python tools/uneven_decode_ab.py [--lengths 256 1024 2048] [--repeats 6]
"""

from __future__ import annotations

import argparse
import statistics
import time

from agentmem import AgentSession
from agentmem.bench.common import find_document
from agentmem.kv import attention
from agentmem.models import load_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 2048])
    p.add_argument("--repeats", type=int, default=6)
    args = p.parse_args()
    loaded = load_model(args.model)
    text, _ = find_document("argparse")
    all_ids = loaded.tokenizer(text)["input_ids"]
    original, default = attention._per_head_decode, attention.FLAT_DECODE_SLOTS
    spent = [0.0, 0]

    def timed(*a):
        t = time.perf_counter()
        out = original(*a)
        spent[0] += time.perf_counter() - t
        spent[1] += 1
        return out

    attention._per_head_decode = timed
    try:
        for length in args.lengths:
            policy = {"name": "am-halve", "offline_head_budgets": "global"}
            s = AgentSession(model=loaded, max_kv_mb=None, policy=policy)
            s.append_tokens(all_ids[:length])
            s.compact(0.5, queries="recent")
            slots = sorted(layer.used_slots for layer in s.cache.layers)
            per_call = {"flat": [], "heads": []}
            for _ in range(args.repeats):
                for path in per_call:
                    attention.FLAT_DECODE_SLOTS = default if path == "flat" else 0
                    spent[:] = [0.0, 0]
                    s.generate(" The", max_new_tokens=17, ignore_eos=True)
                    per_call[path].append(spent[0] / spent[1] * 1e6)
            m = {k: statistics.median(v) for k, v in per_call.items()}
            print(
                f"{length} tokens (layers of {slots[0]}-{slots[-1]} slots): us per layer call "
                f"flat {m['flat']:.1f}, heads {m['heads']:.1f}, flat/heads {m['flat'] / m['heads']:.3f}",
                flush=True,
            )
    finally:
        attention._per_head_decode, attention.FLAT_DECODE_SLOTS = original, default


if __name__ == "__main__":
    main()
