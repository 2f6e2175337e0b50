"""Tool outputs agents really read, with planted facts to ask about later.

Each generator writes the text a command would print (``pytest -v``, ``git log``, a JSON API
listing, a deploy log, ``cat -n`` of a real source file found on this machine) to about a given
number of tokens, reproducibly from a seed, and returns the facts whose answers are exact strings
of that text (IDs, hashes, line numbers, error messages, test and function names, numbers).
"""

from __future__ import annotations

import ast
import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Fact:
    question: str  # asked as a chat turn, no answer prefix
    answer: str  # an exact string of the output


@dataclass
class ToolOutput:
    kind: str
    tool: str  # the tool's name in the transcript
    command: str  # what the agent ran
    text: str
    facts: list[Fact] = field(default_factory=list)


_WORDS = (
    "cache scheduler parser router billing auth session queue worker upload export index render "
    "config token payment report invoice search webhook metrics gateway ledger profile inventory"
).split()
_VERBS = "Fix Add Remove Refactor Update Handle Guard Retry Document Cache Validate Log".split()
_PEOPLE = ["Ada Byron", "Grace Hopper", "Linus Berg", "Mei Tanaka", "Omar Haddad", "Priya Nair", "Sven Olsen"]


def _hex(rng: random.Random, n: int) -> str:
    return "".join(rng.choice("0123456789abcdef") for _ in range(n))


def _ident(rng: random.Random) -> str:
    return f"{rng.choice(_WORDS)}_{rng.choice(_WORDS)}"


def _fresh(make: Callable[[], str], seen: set[str]) -> str:
    """``make()`` until it gives a string not in ``seen`` (which then holds it): names that answer one way."""
    while (value := make()) in seen:
        pass
    seen.add(value)
    return value


def _grow(make_line: Callable[[int], str], tokens: int, count: Callable[[str], int], head: str = "") -> list[str]:
    """Lines from ``make_line(i)`` until the text holds about ``tokens`` tokens."""
    lines: list[str] = []
    per = max(1, count("\n".join(make_line(i) for i in range(20))) // 20)
    need = max(8, (tokens - count(head)) // per)
    for i in range(need):
        lines.append(make_line(i))
    return lines


def pytest_report(tokens: int, seed: int, count: Callable[[str], int]) -> ToolOutput:
    """``pytest -v``: one line per test, two failures with tracebacks at the end."""
    rng = random.Random(seed)
    modules = [f"tests/test_{w}.py" for w in rng.sample(_WORDS, 8)]
    names: set[str] = set()

    def test_line(i: int) -> str:
        name = _fresh(lambda: f"test_{_ident(rng)}", names)
        pct = min(99, i // 3)
        return f"{rng.choice(modules)}::{name} PASSED{' ' * 10}[{pct:3d}%]"

    head = "$ pytest -v tests/\n============================= test session starts ==============================\n"
    lines = _grow(test_line, int(tokens * 0.85), count, head)
    failing: list[tuple] = []
    while len(failing) < 2:
        i = rng.randrange(len(lines))
        module, rest = lines[i].split("::", 1)
        if any(module == f[0] for f in failing) or " FAILED" in rest:
            continue  # one failure per module: "which test failed in <module>" has one answer
        name = rest.split()[0]
        lines[i] = f"{module}::{name} FAILED{' ' * 10}[{min(99, i // 3):3d}%]"
        failing.append((module, name, rng.randrange(40, 900), rng.choice([404, 409, 422, 500, 503]), _hex(rng, 8)))
    tail = ["", "=================================== FAILURES ==================================="]
    for module, name, line, status, req in failing:
        tail += [
            f"___________________________ {name} ___________________________",
            "",
            f"    def {name}(client):",
            f'        resp = client.post("/v1/{name.split("_")[1]}", json=payload)',
            ">       assert resp.status_code == 200",
            f"E       AssertionError: assert {status} == 200",
            f"E        +  where {status} = <Response [{status}]>.status_code  (request id {req})",
            "",
            f"{module}:{line}: AssertionError",
        ]
    passed = len(lines) - 2
    bar = "=" * 27
    tail.append(f"{bar} 2 failed, {passed} passed in {rng.uniform(3, 60):.2f}s {bar}")
    text = head + "\n".join(lines + tail) + "\n"
    (m1, n1, l1, s1, r1), (m2, n2, l2, s2, r2) = failing
    facts = [
        Fact(f"Which test failed in {m1}? Answer with the test function's name only.", n1),
        Fact(f"In the pytest output, at which line of {m2} did {n2} fail? Answer with the line number only.", str(l2)),
        Fact(f"What status code did the request in {n1} return? Answer with the number only.", str(s1)),
        Fact(f"What was the request id of the failing request in {n2}? Answer with the id only.", r2),
    ]
    return ToolOutput("pytest", "run_tests", "pytest -v tests/", text, facts)


def git_log(tokens: int, seed: int, count: Callable[[str], int]) -> ToolOutput:
    """``git log --format='%h %an %ad %s'``: short hashes, authors, dates, subjects."""
    rng = random.Random(seed)
    subjects: set[str] = set()

    def commit(i: int) -> str:
        subject = _fresh(
            lambda: f"{rng.choice(_VERBS)} {rng.choice(_WORDS)} {rng.choice(_WORDS)} in {_ident(rng)}", subjects
        )
        day = 28 - (i // 6) % 28
        return f"{_hex(rng, 7)} {rng.choice(_PEOPLE)} 2026-11-{day:02d} {subject}"

    head = "$ git log --format='%h %an %ad %s' --date=short\n"
    lines = _grow(commit, tokens, count, head)
    picks = rng.sample(range(len(lines)), 4)
    facts = []
    for j, i in enumerate(picks):
        h, first, last, date, subject = lines[i].split(" ", 4)
        if j % 2 == 0:
            facts.append(Fact(f'What is the short hash of the commit "{subject}"? Answer with the hash only.', h))
        else:
            facts.append(Fact(f"What is the subject of commit {h}? Answer with the subject only.", subject))
    return ToolOutput("git_log", "git", "git log", head + "\n".join(lines) + "\n", facts)


def api_listing(tokens: int, seed: int, count: Callable[[str], int]) -> ToolOutput:
    """A JSON listing of services from an API (one object per line, as ``jq -c`` prints)."""
    rng = random.Random(seed)
    used: set[str] = set()
    regions = ["eu-west-1", "us-east-2", "ap-south-1", "eu-central-1", "us-west-2"]
    statuses = ["running", "running", "running", "degraded", "stopped", "deploying"]

    def service(i: int) -> str:
        name = _fresh(lambda: f"{rng.choice(_WORDS)}-{rng.choice(_WORDS)}-{rng.randrange(10, 99)}", used)
        return (
            f'{{"id": "srv-{_hex(rng, 6)}", "name": "{name}", "status": "{rng.choice(statuses)}", '
            f'"region": "{rng.choice(regions)}", "replicas": {rng.randrange(1, 13)}, '
            f'"port": {rng.randrange(3000, 9999)}}}'
        )

    head = "$ curl -s https://api.internal/v2/services | jq -c '.items[]'\n"
    lines = _grow(service, tokens, count, head)
    facts = []
    for j, i in enumerate(rng.sample(range(len(lines)), 4)):
        item = json.loads(lines[i])
        if j % 2 == 0:
            facts.append(
                Fact(f"What is the id of the service named {item['name']}? Answer with the id only.", item["id"])
            )
        else:
            facts.append(
                Fact(f"Which port does service {item['id']} listen on? Answer with the number only.", str(item["port"]))
            )
    return ToolOutput("api", "http_get", "GET /v2/services", head + "\n".join(lines) + "\n", facts)


def deploy_log(tokens: int, seed: int, count: Callable[[str], int]) -> ToolOutput:
    """A deploy log: timestamped INFO lines, one WARN and one ERROR with a rollback id."""
    rng = random.Random(seed)
    steps = [
        "pulling image",
        "health check passed",
        "scaling pod",
        "migrating schema",
        "warming cache",
        "draining node",
        "rotating key",
        "syncing config",
        "attaching volume",
        "updating route",
    ]

    def line(i: int) -> str:
        s = i * 7 + rng.randrange(7)
        return (
            f"2026-12-01T10:{(s // 60) % 60:02d}:{s % 60:02d}Z INFO  {rng.choice(steps)} "
            f"{_ident(rng).replace('_', '-')}-{_hex(rng, 5)} ({rng.randrange(20, 900)} ms)"
        )

    head = "$ kubectl logs deploy/release-7 --since=1h\n"
    lines = _grow(line, tokens, count, head)
    rb, code, node = f"RB-{rng.randrange(10000, 99999)}", f"E{rng.randrange(1000, 9999)}", f"node-{_hex(rng, 4)}"
    w, e = sorted(rng.sample(range(len(lines) // 4, len(lines)), 2))
    lines[w] = lines[w].split(" INFO ")[0] + f" WARN  disk pressure on {node} (91% used)"
    lines[e] = lines[e].split(" INFO ")[0] + f" ERROR migration failed with code {code}; ROLLBACK_ID={rb}"
    facts = [
        Fact("What is the ROLLBACK_ID in the deploy log? Answer with the id only.", rb),
        Fact("Which error code did the migration fail with? Answer with the code only.", code),
        Fact("Which node reported disk pressure? Answer with the node name only.", node),
    ]
    return ToolOutput("deploy_log", "logs", "kubectl logs", head + "\n".join(lines) + "\n", facts)


def source_file(tokens: int, seed: int, count: Callable[[str], int]) -> ToolOutput:
    """``cat -n`` of a real standard-library module found on this machine, cut to about ``tokens``."""
    import sysconfig
    from pathlib import Path

    rng = random.Random(seed)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    candidates = ["textwrap.py", "shlex.py", "fnmatch.py", "netrc.py", "sched.py", "graphlib.py", "calendar.py"]
    path = stdlib / candidates[seed % len(candidates)]
    src = path.read_text(encoding="utf-8").splitlines()
    numbered = [f"{i + 1:6d}\t{line}" for i, line in enumerate(src)]
    head = f"$ cat -n {path}\n"
    keep, total = [], count(head)
    for line in numbered:
        total += count(line) + 1
        if total > tokens:
            break
        keep.append(line)
    defs = []
    for node in ast.walk(ast.parse("\n".join(src))):
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.lineno <= len(keep):
            if not node.name.startswith("__"):
                defs.append((node.name, node.lineno, "class" if isinstance(node, ast.ClassDef) else "function"))
    defs = [d for d in defs if sum(n == d[0] for n, _, _ in defs) == 1]
    facts = [
        Fact(f"On which line of {path.name} is the {what} {name} defined? Answer with the line number only.", str(line))
        for name, line, what in rng.sample(defs, min(4, len(defs)))
    ]
    return ToolOutput("source", "read_file", f"cat -n {path.name}", head + "\n".join(keep) + "\n", facts)


GENERATORS: dict[str, Callable[[int, int, Callable[[str], int]], ToolOutput]] = {
    "pytest": pytest_report,
    "git_log": git_log,
    "api": api_listing,
    "deploy_log": deploy_log,
    "source": source_file,
}


def tool_output(kind: str, tokens: int, seed: int, tokenizer) -> ToolOutput:
    """One tool output of ``kind`` of about ``tokens`` tokens of ``tokenizer``."""

    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    out = GENERATORS[kind](tokens, seed, count)
    for f in out.facts:
        if f.answer not in out.text:
            raise AssertionError(f"{kind}: the answer {f.answer!r} is not in the output")
    return out
