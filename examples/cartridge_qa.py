"""Build a cartridge from a long document once, save it, and answer questions from it in fresh sessions.

The document is a team handbook (~3,000 tokens: services, on-call, release rules) with a few facts
no model knows. It is read and compacted once with Attention Matching (``Cartridge.build``), saved
to one file, loaded, and mounted as the pinned prefix of a new session per question. The same
questions are asked with the document kept exact (``ratio=1``) for comparison.

python examples/cartridge_qa.py --ratio 0.1 --max-kv-mb 64
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

from agentmem import AgentSession, BudgetError
from agentmem.cartridge import Cartridge

FACTS = [
    "Emergency code word: PELICAN-77. Say it on the bridge call to page every team at once.",
    "Staging cluster ID: SC-4471-bluefin. Production runs on marlin.",
    "Release freeze: every Friday from 15:00 until Monday 08:00.",
]
# SmolLM2-135M does not answer the bare questions even with the whole document in memory; it does
# complete the start of an answer that repeats the document's wording, so replies are begun for it.
QUESTIONS = [
    ("What is the emergency code word?", "The handbook says: Emergency code word:", "PELICAN-77"),
    ("What is the ID of the staging cluster?", "The handbook says: Staging cluster ID:", "SC-4471"),
    ("When are releases frozen?", "The handbook says: Release freeze:", "Friday"),
]


def handbook(tokens: int = 3000, seed: int = 0) -> str:
    """Filler sections about made-up services, with the FACTS spread through the document."""
    rng = random.Random(seed)
    services = ["search", "catalog", "images", "payments-gateway", "notifications", "auth", "reports", "cart"]
    teams = ["Falcon", "Otter", "Lynx", "Badger", "Marten", "Ibis", "Wren"]
    paragraphs, facts = [], list(FACTS)
    i = 0
    while len(" ".join(paragraphs)) < tokens * 3.2:  # ~3.2 characters per token for this prose
        svc, team = rng.choice(services), rng.choice(teams)
        paragraphs.append(
            f"## Section {i + 1}: {svc}\n"
            f"The {svc} service is maintained by team {team}. It keeps {rng.randint(2, 9)} replicas in each region "
            f"and scales up when latency passes {rng.randint(80, 400)} ms. Dashboards live under /d/{svc}. "
            f"Incidents are reviewed within {rng.randint(2, 5)} working days, and runbooks are updated afterwards."
        )
        if i % 7 == 3 and facts:
            paragraphs.append(facts.pop(0))
        i += 1
    paragraphs.extend(facts)
    return "# Platform team handbook\n\n" + "\n\n".join(paragraphs)


def answer(session: AgentSession, question: str, start: str) -> str:
    session.append(question, role="user")
    return session.generate(f"<|im_start|>assistant\n{start}", max_new_tokens=8).text.strip()


def ask_all(make_session) -> None:
    for question, start, expected in QUESTIONS:
        t0 = time.perf_counter()
        reply = answer(make_session(), question, start)
        verdict = "correct" if expected in reply else "wrong"
        print(f"  Q: {question}\n  A: {start} {reply!r} -> {verdict} ({time.perf_counter() - t0:.1f} s)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ratio", type=float, default=0.1, help="fraction of the document's KV the cartridge keeps")
    p.add_argument("--max-kv-mb", type=float, default=64.0, help="budget of each session that mounts it")
    p.add_argument("--tokens", type=int, default=3000, help="size of the document")
    args = p.parse_args()
    doc = handbook(args.tokens)

    exact = AgentSession(max_kv_mb=None)  # the baseline: the whole document exact in memory
    exact.append(doc)
    print(f"document: {len(doc):,} characters, {exact.stats.logical_tokens} tokens; exact in memory:")
    ask_all(exact.fork)

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        path = Cartridge.build(None, doc, ratio=args.ratio).save(Path(tmp) / "handbook.cartridge")
        t1 = time.perf_counter()
        cart = Cartridge.load(path)  # what a teammate does with the file
        ev = cart.compaction
        heads = sum(len(layer["lengths"]) for layer in cart.meta["cache"]["layers"])
        fit = f", fit error {ev.fit_output_error:.3f}" if ev is not None and ev.fit_output_error is not None else ""
        print(
            f"cartridge (ratio {args.ratio:g}): {cart.entries() / heads:.0f} entries per layer and head, "
            f"file {path.stat().st_size / 2**20:.1f} MiB, built and saved in {t1 - t0:.1f} s{fit}; "
            f"each question in a fresh session of max_kv_mb={args.max_kv_mb:g} that mounts it:"
        )
        try:
            ask_all(lambda: cart.session(max_kv_mb=args.max_kv_mb))
        except BudgetError as exc:
            print(f"  {exc}")


if __name__ == "__main__":
    main()
