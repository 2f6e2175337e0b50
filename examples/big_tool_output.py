"""A 20,000-token tool output read under max_kv_mb=32 (about 730 tokens of fp32 KV on the default model).

An agent asks for a deploy log; the log (a realistic service log, ~20k model tokens) is read into
memory as a tool message and compacted right after it is read. A question whose answer sits near
the end of the log is then answered from memory. Prints the receipt, the memory stats and the
answer, and checks the answer first with the full (uncompacted) cache on the end of the log.

python examples/big_tool_output.py                      # default: 20,000 tokens, 32 MiB
python examples/big_tool_output.py --policy streaming   # same budget, sinks + recent window
"""

from __future__ import annotations

import argparse
import random
import sys
import time

from agentmem import AgentSession
from agentmem.tools import span_entries

SYSTEM = "You are a deployment assistant. Answer questions about tool outputs briefly and exactly."
TASK = "Deploy shop-api v2.31.7 to production and tell me the rollback id if the rollout fails."
QUESTION = "What is the ROLLBACK_ID in the log?"
# SmolLM2-135M does not answer the bare question even with the whole log in memory (it quotes the
# first timestamp); it does complete the start of an answer, so the assistant's reply is begun for it.
ANSWER_START = "<|im_start|>assistant\nThe log says ROLLBACK_ID="
ANSWER = "RB-58213"
NEEDLE = (
    "2025-03-14T11:58:02.113Z ERROR [deploy] rollout of shop-api v2.31.7 failed: image signature mismatch; "
    f"ROLLBACK_ID={ANSWER} (v2.31.6 restored)"
)


def deploy_log(tokenizer, tokens: int, tail_lines: int, seed: int = 0) -> str:
    """A service log of about ``tokens`` model tokens; the ERROR line sits ``tail_lines`` lines from the end."""
    rng = random.Random(seed)
    paths = ["/api/v2/orders", "/api/v2/cart", "/api/v2/users", "/healthz", "/api/v2/search", "/metrics"]
    lines, total, t = [], 0, 10 * 3600
    while total < tokens:
        t += rng.randint(1, 900) / 1000
        stamp = f"2025-03-14T{int(t // 3600):02d}:{int(t % 3600 // 60):02d}:{t % 60:06.3f}Z"
        kind = rng.random()
        if kind < 0.8:
            line = (
                f"{stamp} INFO  [worker-{rng.randint(1, 8)}] GET {rng.choice(paths)}/{rng.randint(1000, 99999)} "
                f"200 {rng.randint(2, 180)}ms"
            )
        elif kind < 0.95:
            line = f"{stamp} DEBUG [pool] connections active={rng.randint(3, 40)} idle={rng.randint(0, 12)}"
        else:
            line = f"{stamp} WARN  [cache] slow lookup key=sess:{rng.getrandbits(32):08x} {rng.randint(200, 900)}ms"
        lines.append(line)
        total += len(tokenizer(line + "\n", add_special_tokens=False)["input_ids"])
    lines.insert(len(lines) - tail_lines, NEEDLE)
    return "\n".join(lines)


def ask(session: AgentSession, log: str, ratio: float | None) -> tuple[str, object]:
    session.append(SYSTEM, role="system", pin=True)
    session.append(TASK, role="user")  # the agent would call its deploy tool here
    receipt = session.tool_result("deploy", log, ratio=ratio)
    session.append(QUESTION, role="user")
    return session.generate(ANSWER_START, max_new_tokens=8).text.strip(), receipt


def needle_entries(session: AgentSession, log: str, receipt) -> tuple[int, float]:
    """(tokens of the ERROR line, cache entries left for them): fewer entries = it was compacted."""
    tok = session.tokenizer
    start = receipt.span[0] + len(tok(log[: log.index(NEEDLE)], add_special_tokens=False)["input_ids"])
    n = len(tok(NEEDLE, add_special_tokens=False)["input_ids"])
    return n, span_entries(session.cache, start, start + n)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=20000, help="size of the tool output (model tokens)")
    p.add_argument("--max-kv-mb", type=float, default=32.0)
    p.add_argument("--tail-lines", type=int, default=5, help="log lines after the ERROR line")
    p.add_argument("--ratio", type=float, default=None, help="tool compaction ratio (default: the policy's)")
    p.add_argument("--policy", default=None)
    p.add_argument("--skip-check", action="store_true", help="skip the full-cache check")
    args = p.parse_args()

    session = AgentSession(max_kv_mb=args.max_kv_mb, policy=args.policy)
    log = deploy_log(session.tokenizer, args.tokens, args.tail_lines)
    after = log[log.index(NEEDLE) + len(NEEDLE) :]
    n_after = len(session.tokenizer(after, add_special_tokens=False)["input_ids"])
    print(f"tool output: {len(log):,} characters; the ERROR line is {n_after} tokens from its end")

    if not args.skip_check:  # can the model answer with everything in memory? (the log's last ~2,000 tokens)
        lines, n = log.split("\n"), 0
        while n < 2000 and len(lines) > 1:
            n += len(session.tokenizer(lines.pop() + "\n", add_special_tokens=False)["input_ids"])
        short = log[len("\n".join(lines)) + 1 :]
        full = AgentSession(session.loaded, max_kv_mb=None)
        answer, _ = ask(full, short, ratio=1.0)
        print(f"full cache, last ~2,000 tokens of the log: {answer!r} -> {'correct' if ANSWER in answer else 'wrong'}")

    t0 = time.perf_counter()
    answer, receipt = ask(session, log, args.ratio)
    print(receipt.summary())
    for key, value in receipt.as_dict(events=False).items():
        print(f"  {key}: {value}")
    st = session.stats
    print(
        f"memory: {st.kv_bytes / 2**20:.2f} MiB now, peak {st.peak_kv_bytes / 2**20:.2f} MiB of "
        f"{args.max_kv_mb:g} MiB; {st.logical_tokens:,} tokens read, {st.physical_tokens:.0f} entries stored, "
        f"{len(st.compactions)} compactions"
    )
    n, kept = needle_entries(session, log, receipt)
    print(f"the ERROR line: {n} tokens, {kept:.1f} cache entries when the question is asked (per layer and head)")
    verdict = "correct" if ANSWER in answer else "wrong"
    print(f"question: {QUESTION}  (answer begun: 'The log says ROLLBACK_ID=')")
    print(f"answer from compacted memory: {answer!r} -> {verdict} (expected {ANSWER})")
    print(f"[{time.perf_counter() - t0:.0f} s]", file=sys.stderr)


if __name__ == "__main__":
    main()
