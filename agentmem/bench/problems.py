"""Reasoning problems with checkable answers, answer extraction and the intervals reported on them.

Problems come from ``reasoning-gym`` (its wheel ships the generators; nothing is downloaded):
seeded ``gsm_symbolic`` word problems. The model is asked to reason step by step and put its
final answer in ``\\boxed{}``; the answer is the last boxed expression (else the number after
"answer is", else the last number), compared with the generator's answer by ``math-verify``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

INSTRUCTION = "\nPlease reason step by step, and put your final answer within \\boxed{}."
FORCE_ANSWER = "\n\nFinal answer: \\boxed{"  # appended when a run stops before giving an answer


@dataclass(frozen=True)
class Problem:
    index: int
    question: str
    answer: str
    source: str  # the generator, e.g. "gsm_symbolic"

    def messages(self) -> list[dict]:
        return [{"role": "user", "content": self.question + INSTRUCTION}]


def problems(n: int, seed: int, dataset: str = "gsm_symbolic") -> list[Problem]:
    """``n`` seeded problems of a reasoning-gym generator."""
    try:
        import reasoning_gym
    except ImportError as exc:  # an optional dependency of the benchmarks
        raise ImportError("agentmem bench reasoning needs reasoning-gym: pip install 'agentmem[bench]'") from exc
    data = reasoning_gym.create_dataset(dataset, size=n, seed=seed)
    return [Problem(i, item["question"], str(item["answer"]), dataset) for i, item in enumerate(data)]


_BOXED = re.compile(r"\\boxed\{")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def _boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (braces balanced; an unclosed one runs to the end)."""
    starts = [m.end() for m in _BOXED.finditer(text)]
    if not starts:
        return None
    i, depth, out = starts[-1], 1, []
    while i < len(text):
        c = text[i]
        depth += (c == "{") - (c == "}")
        if depth == 0:
            break
        out.append(c)
        i += 1
    return "".join(out).strip() or None


def extract_answer(text: str) -> str | None:
    """The model's final answer in ``text``: last boxed, else after "answer is", else the last number."""
    boxed = _boxed(text)
    if boxed is not None:
        return boxed
    m = re.findall(r"answer is[:\s]*\$?\s*(-?\d[\d,]*(?:\.\d+)?)", text, flags=re.IGNORECASE)
    if m:
        return m[-1]
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def is_correct(answer: str | None, gold: str) -> bool:
    """Whether ``answer`` equals ``gold`` (math-verify: numbers, fractions, LaTeX; units ignored)."""
    if answer is None:
        return False
    from math_verify import parse, verify

    plain = answer.replace(",", "").replace("\\$", "").replace("$", "").strip()
    plain = re.sub(r"\\(?:text|mathrm)\{[^{}]*\}", "", plain).strip()  # "72 \text{ clips}" -> "72"
    try:
        return bool(verify(parse(f"${gold}$"), parse(f"${plain}$")))
    except Exception:  # math-verify's parsers raise on malformed LaTeX: not an answer
        return False


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion k / n."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return max(0.0, mid - half), min(1.0, mid + half)


def paired_difference(a: list[bool], b: list[bool], z: float = 1.96) -> tuple[float, float, float]:
    """Mean of a - b over the same problems and its 95% interval (normal approximation on the
    paired differences: only problems where the two disagree add variance)."""
    n = len(a)
    if n == 0:
        return 0.0, 0.0, 0.0
    d = [float(x) - float(y) for x, y in zip(a, b)]
    mean = sum(d) / n
    var = sum((x - mean) ** 2 for x in d) / max(1, n - 1)
    half = z * math.sqrt(var / n)
    return mean, mean - half, mean + half
