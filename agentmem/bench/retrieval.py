"""Key -> value retrieval from a long tool-style output: exact match after compaction.

The tool output is a table of random session ids and user ids, as ``cat`` would print it
(``$ cat sessions.tsv``, one ``<6 hex digits> <6 digits>`` record per line). The question is
asked after compaction, so no method knows it in advance: the session reads ``Lookup:\\n<key> ``
and must continue greedily with the key's value. A probe counts when the generated text starts
with the exact value.

Not every model can do this even with its full cache (SmolLM2-135M gets roughly half of the probes
of a 2,000-token table right, Gemma 3 270M all of them), so the benchmark measures the full cache
first and reports the task on the model given by ``--retrieval-model``.
"""

from __future__ import annotations

import random

from ..agent import AgentSession

HEADER = "$ cat sessions.tsv  # session id, user id\n"


def tool_output(records: int, seed: int = 0) -> tuple[str, list[tuple[str, str]]]:
    """The tool output text and its (key, value) records, reproducibly from ``seed``."""
    rng = random.Random(seed)
    pairs, seen = [], set()
    while len(pairs) < records:
        key = f"{rng.randrange(16**6):06x}"
        if key not in seen:
            seen.add(key)
            pairs.append((key, str(rng.randrange(10**5, 10**6))))
    return HEADER + "\n".join(f"{k} {v}" for k, v in pairs) + "\n", pairs


def records_for_tokens(tokenizer, tokens: int, seed: int = 0) -> int:
    """How many records make a tool output of about ``tokens`` tokens for this tokenizer."""
    text, _ = tool_output(100, seed)
    per_record = (len(tokenizer(text)["input_ids"]) - len(tokenizer(HEADER)["input_ids"])) / 100
    return max(4, int(tokens / per_record))


def probes(pairs: list[tuple[str, str]], n: int) -> list[tuple[str, str]]:
    """n records spread evenly over the output, the first and the last included."""
    if n >= len(pairs):
        return list(pairs)
    return [pairs[round(i * (len(pairs) - 1) / (n - 1))] for i in range(n)] if n > 1 else [pairs[-1]]


def exact_match(session: AgentSession, asked: list[tuple[str, str]]) -> float:
    """Share of probes whose greedy answer starts with the exact value (the session is unchanged)."""
    hits = 0
    for key, value in asked:
        probe = session.fork()
        out = probe.generate(f"Lookup:\n{key} ", max_new_tokens=len(value) + 1, ignore_eos=True).text
        hits += out.strip().startswith(value)
    return hits / len(asked)
