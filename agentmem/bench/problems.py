"""Reasoning problems with checkable answers, answer extraction and the intervals reported on them.

Problems come from ``reasoning-gym`` (its wheel ships the generators; nothing is downloaded).
A prompt holds ``per_prompt`` seeded problems of one generator (the default: six 3-term ``chain_sum``
problems of 2-digit numbers), to be solved in turn, each answer in its own ``\\boxed{}``: the model
has to read problem k back from its memory after the work on problems 1..k-1 has filled (and, under
a budget, compacted) it. With ``per_prompt=1`` a prompt is one problem (e.g. ``gsm_symbolic``) and
the answer is the last boxed expression (else the number after "answer is", else the last number).
Answers are compared with the generator's by ``math-verify``.

Accuracy counts sub-problems; the problems of one prompt share a fate (one trace), so intervals are
clustered by prompt (design effect on Wilson's interval; cluster-robust paired differences).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

INSTRUCTION = "\nPlease reason step by step, and put your final answer within \\boxed{}."
MULTI_INSTRUCTION = (
    "Solve each of the following problems. For each one, work it out step by step, then give its answer "
    "in its own \\boxed{}.\n\n"
)
FORCE_ANSWER = "\n\nFinal answer: \\boxed{"  # appended when a one-problem run stops before giving an answer

# generator settings: problems a 0.5B model solves alone most of the time (see docs/benchmarks/reasoning.md)
GENERATOR_SETTINGS: dict[str, dict] = {
    "chain_sum": {"min_terms": 3, "max_terms": 3, "min_digits": 2, "max_digits": 2},
}


@dataclass(frozen=True)
class Problem:
    """One prompt: ``question`` is the user turn, ``answers`` one gold answer per sub-problem."""

    index: int
    question: str
    answers: tuple[str, ...]
    source: str  # the generator, e.g. "chain_sum"

    def messages(self) -> list[dict]:
        return [{"role": "user", "content": self.question}]

    @property
    def answer(self) -> str:
        return ", ".join(self.answers)

    def grade(self, text: str) -> list[bool]:
        """Per sub-problem, whether ``text`` answers it correctly."""
        given = answers_in(text, len(self.answers))
        return [is_correct(a, g) for a, g in zip(given, self.answers)]


def problems(n: int, seed: int, dataset: str = "chain_sum", per_prompt: int = 6) -> list[Problem]:
    """``n`` prompts of ``per_prompt`` seeded problems each from a reasoning-gym generator."""
    try:
        import reasoning_gym
    except ImportError as exc:  # an optional dependency of the benchmarks
        raise ImportError("agentmem bench reasoning needs reasoning-gym: pip install 'agentmem[bench]'") from exc
    if per_prompt < 1:
        raise ValueError(f"per_prompt must be >= 1 (got {per_prompt})")
    settings = GENERATOR_SETTINGS.get(dataset, {})
    items = list(reasoning_gym.create_dataset(dataset, size=n * per_prompt, seed=seed, **settings))
    if per_prompt == 1:
        return [Problem(i, it["question"] + INSTRUCTION, (str(it["answer"]),), dataset) for i, it in enumerate(items)]
    out = []
    for i in range(n):
        part = items[i * per_prompt : (i + 1) * per_prompt]
        lines = [f"Problem {j + 1}: {_statement(it['question'])}" for j, it in enumerate(part)]
        out.append(Problem(i, MULTI_INSTRUCTION + "\n".join(lines), tuple(str(it["answer"]) for it in part), dataset))
    return out


def _statement(question: str) -> str:
    """A generator's question without its boilerplate ("State the final answer to ...: 4 - 1 =" -> "4 - 1")."""
    if ": " in question and re.fullmatch(r"[\d\s.+\-*/()=]+", question.rsplit(": ", 1)[1]):
        return question.rsplit(": ", 1)[1].rstrip(" =")
    return question.strip()


_BOXED = re.compile(r"\\boxed\{")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
_HEADING = re.compile(r"Problem\s+(\d+)", re.IGNORECASE)


def boxed(text: str) -> list[tuple[int, int, int]]:
    """Every ``\\boxed{...}`` in ``text`` as (offset of the box, start, end of its content); braces
    balanced, an unclosed one runs to the end."""
    out = []
    for m in _BOXED.finditer(text):
        i, depth = m.end(), 1
        while i < len(text):
            depth += (text[i] == "{") - (text[i] == "}")
            if depth == 0:
                break
            i += 1
        out.append((m.start(), m.end(), i))
    return out


def extract_answer(text: str) -> str | None:
    """The model's final answer in ``text``: last boxed, else after "answer is", else the last number."""
    found = [text[a:b].strip() for _, a, b in boxed(text) if text[a:b].strip()]
    if found:
        return found[-1]
    m = re.findall(r"answer is[:\s]*\$?\s*(-?\d[\d,]*(?:\.\d+)?)", text, flags=re.IGNORECASE)
    if m:
        return m[-1]
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def answer_spans(text: str, k: int) -> list[tuple[int, int] | None]:
    """Where the answer to each of k sub-problems is written (character span of a box's content): a
    box belongs to the last "Problem N" named before it (the last such box wins); with no such name,
    the boxes in order."""
    boxes = boxed(text)
    heads = [(m.start(), int(m.group(1))) for m in _HEADING.finditer(text)]
    out: list[tuple[int, int] | None] = [None] * k
    if not heads:
        for i, (_, a, b) in enumerate(boxes[:k]):
            out[i] = (a, b)
        return out
    for start, a, b in boxes:
        named = [n for pos, n in heads if pos < start]
        if named and 1 <= named[-1] <= k:
            out[named[-1] - 1] = (a, b)
    return out


def answers_in(text: str, k: int) -> list[str | None]:
    """The answers to k sub-problems (:func:`answer_spans`); k == 1: :func:`extract_answer`."""
    if k == 1:
        return [extract_answer(text)]
    return [None if span is None else text[span[0] : span[1]].strip() or None for span in answer_spans(text, k)]


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


def wilson(k: float, n: float, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion k / n (n may be an effective, fractional size)."""
    if n <= 0:
        return 0.0, 1.0
    p = k / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(max(0.0, p * (1 - p) / n + z * z / (4 * n * n))) / den
    return max(0.0, mid - half), min(1.0, mid + half)


def clustered_wilson(groups: Sequence[Sequence[bool]], z: float = 1.96) -> tuple[float, float]:
    """Wilson's interval of the share of True over all items, with the sample size divided by the
    design effect of the groups (items of one prompt are correlated); one item a group: plain Wilson."""
    n = sum(len(g) for g in groups)
    k = sum(sum(g) for g in groups)
    if n == 0:
        return 0.0, 1.0
    p, j = k / n, len(groups)
    binomial = p * (1 - p) / n
    if j > 1 and binomial > 0 and any(len(g) > 1 for g in groups):
        resid = sum((sum(g) - p * len(g)) ** 2 for g in groups)
        clustered = j / (j - 1) * resid / n**2
        deff = max(1.0, clustered / binomial)
    else:
        deff = 1.0
    return wilson(k / deff, n / deff, z)


def paired_difference(
    a: Sequence[Sequence[bool]] | Sequence[bool], b: Sequence[Sequence[bool]] | Sequence[bool], z: float = 1.96
) -> tuple[float, float, float]:
    """Mean of a - b over the same items and its 95% interval, cluster-robust over the groups (a list
    of bools is one item a group). Only items where the two disagree add variance."""
    ga = [list(x) if isinstance(x, (list, tuple)) else [x] for x in a]
    gb = [list(x) if isinstance(x, (list, tuple)) else [x] for x in b]
    n = sum(len(g) for g in ga)
    if n == 0:
        return 0.0, 0.0, 0.0
    d = [sum(float(x) - float(y) for x, y in zip(p, q)) for p, q in zip(ga, gb)]
    mean = sum(d) / n
    j = len(d)
    resid = sum((dj - mean * len(g)) ** 2 for dj, g in zip(d, ga))
    half = z * math.sqrt(j / max(1, j - 1) * resid) / n
    return mean, mean - half, mean + half
