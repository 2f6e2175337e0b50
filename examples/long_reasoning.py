"""Keep reasoning far past what the KV budget holds, printing a receipt at every compaction.

--mode reasoning (default): a chat problem, pinned so that it stays exact in memory, and an
assistant that works on it step by step; whenever it stops, it is asked to check its work and go
on, until --tokens tokens have been generated. Memory never exceeds --max-kv-mb.
--mode story: raw-text continuation past end-of-sequence (sampled), the plain "endless" run.

python examples/long_reasoning.py --max-kv-mb 12 --tokens 1500
python examples/long_reasoning.py --mode story --max-kv-mb 8 --tokens 3000
"""

from __future__ import annotations

import argparse
import sys
import time

from agentmem import AgentSession
from agentmem.tools import span_entries

SYSTEM = "You are a careful math tutor. Reason step by step and show every calculation."
PROBLEM = (
    "A water tank holds 1,200 litres. Pipe A fills it in 30 minutes, pipe B fills it in 45 minutes, and a drain "
    "empties a full tank in 90 minutes. The tank starts empty; A and the drain are opened at 9:00, B at 9:10. "
    "At what time is the tank full?"
)
CONTINUE = "Check each step of your work again, fix any mistake, and continue."


def show(events) -> int:
    """Print a stream (text to stdout, receipts to stderr); returns the tokens generated."""
    n = 0
    for ev in events:
        if ev.kind == "token":
            print(ev.text, end="", flush=True)
        elif ev.kind == "compaction":
            print("\n" + ev.compaction.receipt(), file=sys.stderr, flush=True)
        elif ev.kind == "done":
            n = ev.result.stats.generated_tokens
    return n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=["reasoning", "story"], default="reasoning")
    p.add_argument("--max-kv-mb", type=float, default=12.0)
    p.add_argument("--tokens", type=int, default=1500, help="tokens to generate in all")
    p.add_argument("--policy", default=None)
    args = p.parse_args()
    session = AgentSession(max_kv_mb=args.max_kv_mb, policy=args.policy)
    t0 = time.perf_counter()
    generated, turns = 0, 0
    if args.mode == "story":
        prompt = "Chapter 1\n\nThe lighthouse keeper had not spoken to anyone in eleven years."
        events = session.stream(prompt, max_new_tokens=args.tokens, temperature=0.8, top_p=0.95, ignore_eos=True)
        generated = show(events)
    else:
        session.append(SYSTEM, role="system", pin=True)
        session.append(PROBLEM, role="user", pin=True)
        message = "Solve it step by step."
        while generated < args.tokens:
            print(f"\n\n--- user: {message}\n--- assistant: ", end="")
            generated += show(session.chat_stream(message, max_new_tokens=min(400, args.tokens - generated)))
            message, turns = CONTINUE, turns + 1
    st = session.stats
    pinned = session.pinned
    exact = f"; pinned problem still exact: {all(span_entries(session.cache, a, b) == b - a for a, b in pinned)}"
    print(
        f"\n\n{generated} tokens generated in {turns or 1} turn(s), {st.logical_tokens} tokens read in all, "
        f"{st.physical_tokens:.0f} in memory; peak {st.peak_kv_bytes / 2**20:.2f} of {args.max_kv_mb:g} MiB; "
        f"{len(st.compactions)} compactions{exact if pinned else ''}; {time.perf_counter() - t0:.0f} s",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
