"""Generate far more tokens than the KV budget holds, printing a receipt at every compaction.

python examples/endless_generation.py --max-kv-mb 8 --tokens 3000
"""

from __future__ import annotations

import argparse
import sys

from agentmem import AgentSession


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--max-kv-mb", type=float, default=8.0)
    p.add_argument("--tokens", type=int, default=3000)
    p.add_argument("--policy", default=None)
    args = p.parse_args()
    session = AgentSession(max_kv_mb=args.max_kv_mb, policy=args.policy)
    prompt = "Chapter 1\n\nThe lighthouse keeper had not spoken to anyone in eleven years."
    for ev in session.stream(prompt, max_new_tokens=args.tokens, temperature=0.8, top_p=0.95, ignore_eos=True):
        if ev.kind == "token":
            print(ev.text, end="", flush=True)
        elif ev.kind == "compaction":
            print("\n" + ev.compaction.receipt(), file=sys.stderr)
    st = session.stats
    print(
        f"\n\n{st.logical_tokens} tokens read, {st.physical_tokens:.0f} in memory, "
        f"peak {st.peak_kv_bytes / 2**20:.2f} of {args.max_kv_mb} MiB, {len(st.compactions)} compactions",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
