"""Long reasoning under a fixed budget, judged on answers.

Seeded prompts (bench/problems.py, reasoning-gym generators) are solved step by step with greedy
decoding by a model that can do them (default ``qwen2.5-coder-0.5b``). By default a prompt holds six
short ``chain_sum`` problems to be solved in turn: the trace is ~4x the question, and problem k must
be read back from a memory the work on problems 1..k-1 has filled. ``--dataset gsm_symbolic
--per-prompt 1`` runs single word problems instead. Every condition runs at the same physical budget
of L tokens of KV (``--budgets``, converted to ``max_kv_mb`` with the model's real bytes per token):

* ``unbounded`` (no budget), the reference;
* the policies ``truncate``, ``streaming``, ``h2o``, ``snapkv``, ``kvzip`` (its online path) and
  ``am-halve`` (Attention Matching halvings), which compact online whenever the budget fills --
  the question, read first, is compacted like everything else;
* ``cut L(1+k/2)``: the unbounded run cut at L(1 + k/2) tokens, k = the number of halvings
  ``am-halve`` made on that prompt (the paper's effective-length view); a one-problem run is then
  forced to answer, a multi-problem one keeps the answers it gave before the cut.

A one-problem run that reaches ``--max-new-tokens`` without an answer is forced to give one
(``Final answer: \\boxed{``); in a multi-problem run an unanswered problem is wrong. Reported per
condition: accuracy over sub-problems with its 95% interval (clustered by prompt), the paired
difference to the unbounded run on the same problems (95% interval, clustered), compactions per
prompt, peak KV against the budget, and batched decode throughput including compaction time. Cheap
low-variance fidelity, on ``--fidelity-problems`` prompts: each condition is teacher-forced on the
unbounded run's own trace (in blocks of ``--fidelity-block`` tokens) next to an unbounded session;
top-1 agreement and KL(unbounded || condition) per token, by the number of compactions so far, and
the log-probability of the correct answers. Sessions decode in batches
(``agentmem.session.generate_batch``): each session's budget and compactions are its own, the
matrix products are shared.

    agentmem bench reasoning [--quick] [--problems 16] [--budgets 256 320] [--pin-turn 0.75] [--methods ...]
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from ..agent import AgentSession
from ..batch import forward_batch, generate_batch
from ..models import load_model
from ..units import MiB
from .common import environment, policy_of, run_and_publish
from .problems import FORCE_ANSWER, Problem, answer_spans, answers_in, clustered_wilson, paired_difference, problems

METHODS = ["truncate", "streaming", "h2o", "snapkv", "kvzip", "am-halve"]


@dataclass(frozen=True)
class Condition:
    method: str  # a policy name, "unbounded" or "cut"
    budget: int | None  # physical budget in tokens (None: unbounded)
    pin_turn: float = 0.75  # AgentSession(pin_turn=...): 0 compacts the question like everything else

    @property
    def label(self) -> str:
        if self.budget is None:
            return self.method
        return f"{self.method} @{self.budget}"


def budget_mb(loaded, tokens: int) -> float:
    """The ``max_kv_mb`` that holds ``tokens`` tokens of this model's KV (its real bytes per token)."""
    return AgentSession(model=loaded, max_kv_mb=None).cache.bytes_for_tokens(tokens) / MiB


def prompt_ids(loaded, problem: Problem) -> list[int]:
    """The ids a fresh session reads for the problem's chat turn (as ``AgentSession.chat`` renders it)."""
    text = loaded.tokenizer.apply_chat_template(problem.messages(), tokenize=False, add_generation_prompt=True)
    return list(loaded.tokenizer(text, add_special_tokens=False)["input_ids"])


def _session(loaded, cond: Condition) -> AgentSession:
    if cond.budget is None:
        return AgentSession(model=loaded, max_kv_mb=None)
    mb = budget_mb(loaded, cond.budget)
    return AgentSession(model=loaded, max_kv_mb=mb, policy=policy_of(cond.method), pin_turn=cond.pin_turn)


def _outcome(session: AgentSession, problem: Problem, text: str, finish: str, generated: list[int]) -> dict:
    st = session.stats
    return {
        "problem": problem.index,
        **_graded(problem, text),
        "finish": finish,
        "generated_tokens": len(generated),
        "compactions": len(st.compactions),
        "compaction_seconds": sum(e.seconds for e in st.compactions),
        "peak_kv_bytes": st.peak_kv_bytes,
        "max_kv_bytes": st.max_kv_bytes,
        "within_budget": st.max_kv_bytes is None or st.peak_kv_bytes <= st.max_kv_bytes,
        "physical_tokens": st.physical_tokens,
    }


def _graded(problem: Problem, text: str) -> dict:
    """The answers found in ``text`` and, per sub-problem, whether each is correct."""
    return {
        "answers": answers_in(text, len(problem.answers)),
        "gold": list(problem.answers),
        "correct": problem.grade(text),
    }


def _force_answers(sessions: list[AgentSession], texts: list[str], need: list[int]) -> None:
    """Rows that stopped at the length limit without an answer are asked for one (greedy, <= 12 tokens)."""
    if not need:
        return
    forced = generate_batch([sessions[i] for i in need], [FORCE_ANSWER] * len(need), max_new_tokens=12)
    for i, r in zip(need, forced):
        texts[i] += FORCE_ANSWER + r.text


def decode(loaded, cond: Condition, probs: list[Problem], max_new: int, batch: int, bar: tqdm) -> dict:
    """Every problem under one condition, ``batch`` sessions per batched call (in the given order)."""
    rows: dict[int, dict] = {}
    traces: dict[int, list[int]] = {}
    t0 = time.perf_counter()
    tokens = 0
    for start in range(0, len(probs), batch):
        part = probs[start : start + batch]
        sessions = [_session(loaded, cond) for _ in part]
        results = generate_batch(sessions, [p.messages() for p in part], max_new_tokens=max_new)
        texts = [r.text for r in results]
        tokens += sum(r.stats.generated_tokens for r in results)
        # a one-problem run cut off before its answer is asked for one; a multi-problem run is not
        # (what it did not answer is wrong)
        need = [
            i
            for i, (p, r) in enumerate(zip(part, results))
            if len(p.answers) == 1 and r.finish_reason == "length" and "\\boxed{" not in r.text
        ]
        _force_answers(sessions, texts, need)
        for i, (p, s, r) in enumerate(zip(part, sessions, results)):
            rows[p.index] = _outcome(s, p, texts[i], r.finish_reason, r.token_ids)
            rows[p.index]["forced"] = i in need
            pinned = cond.budget is not None and s.pins_turn(len(prompt_ids(loaded, p)))
            rows[p.index]["question_pinned"] = pinned
            traces[p.index] = r.token_ids
        bar.update(len(part))
    seconds = time.perf_counter() - t0
    ordered = [rows[p.index] for p in sorted(probs, key=lambda p: p.index)]
    comp = sum(r["compaction_seconds"] for r in ordered)
    return {
        "condition": cond.label,
        "method": cond.method,
        "budget_tokens": cond.budget,
        "rows": ordered,
        "seconds": seconds,
        "generated_tokens": tokens,
        "tokens_per_s": tokens / seconds if seconds > 0 else 0.0,
        "compaction_share": comp / seconds if seconds > 0 else 0.0,
        "traces": {i: traces[i] for i in sorted(traces)},
    }


def effective_length(loaded, budget: int, unbounded: dict, halvings: dict, probs: list[Problem], bar) -> dict:
    """The unbounded run cut at L(1 + k/2) tokens (prompt included), then forced to answer."""
    rows = []
    t0 = time.perf_counter()
    by_index = {r["problem"]: r for r in unbounded["rows"]}
    per_token = AgentSession(model=loaded, max_kv_mb=None).cache.bytes_per_token()
    for p in probs:
        k = halvings[p.index]
        prompt = prompt_ids(loaded, p)
        trace = unbounded["traces"][p.index]
        cut = max(len(prompt) + 1, round(budget * (1 + k / 2)))
        row = dict(by_index[p.index])
        row.update(cut_tokens=cut, halvings=k, compactions=0, compaction_seconds=0.0, forced=False)
        if len(prompt) + len(trace) > cut:
            text = loaded.tokenizer.decode(trace[: cut - len(prompt)], skip_special_tokens=True)
            peak = cut * per_token  # the payload of the cut trace (no session runs it)
            if len(p.answers) == 1:  # asked for its answer; a multi-problem run keeps what it answered
                s = AgentSession(model=loaded, max_kv_mb=None)
                s.append_tokens(prompt + trace[: cut - len(prompt)])
                text += FORCE_ANSWER + s.generate(FORCE_ANSWER, max_new_tokens=12).text
                peak = s.stats.peak_kv_bytes
            row.update(_graded(p, text), forced=len(p.answers) == 1, finish="cut")
            row.update(generated_tokens=cut - len(prompt), peak_kv_bytes=peak)
        rows.append(row)
        bar.update(1)
    return {
        "condition": f"cut @{budget}",
        "method": "cut",
        "budget_tokens": budget,
        "rows": rows,
        "seconds": time.perf_counter() - t0,
    }


def _answer_prefix(tokenizer, trace: list[int]) -> list[int]:
    """The trace's tokens up to and including its last "\\boxed{" (or the trace + the forced-answer text)."""
    text = tokenizer.decode(trace, skip_special_tokens=True)
    pos = text.rfind("\\boxed{")
    if pos < 0:
        return trace + list(tokenizer(FORCE_ANSWER, add_special_tokens=False)["input_ids"])
    target = text[: pos + len("\\boxed{")]
    j = 0
    while j < len(trace) and target.startswith(tokenizer.decode(trace[: j + 1], skip_special_tokens=True)):
        j += 1
    rest = target[len(tokenizer.decode(trace[:j], skip_special_tokens=True)) :]
    return trace[:j] + (list(tokenizer(rest, add_special_tokens=False)["input_ids"]) if rest else [])


def teacher_tokens(tokenizer, trace: list[int], problem: Problem, correct: list[bool]) -> tuple[list[int], int, list]:
    """What a condition reads after the prompt when teacher-forced on the unbounded ``trace``:
    (tokens, how many of them are the trace's, groups of token indices that spell a correct answer).

    One problem: the trace up to its last ``\\boxed{``, then the gold answer (counted when the
    unbounded run was right: after a wrong trace, forgetting it can make the gold likelier). Several:
    the whole trace; each answer box of a sub-problem the unbounded run got right is a group.
    """
    if len(problem.answers) == 1:
        prefix = _answer_prefix(tokenizer, trace)
        gold = list(tokenizer(f"{problem.answers[0]}}}", add_special_tokens=False)["input_ids"])
        groups = [list(range(len(prefix), len(prefix) + len(gold)))] if correct[0] else []
        return prefix + gold, len(prefix), groups
    text = tokenizer.decode(trace, skip_special_tokens=True)
    starts = [len(tokenizer.decode(trace[:j], skip_special_tokens=True)) for j in range(len(trace))]
    groups = []
    for ok, span in zip(correct, answer_spans(text, len(problem.answers))):
        if ok and span is not None:
            idx = [j for j, c in enumerate(starts) if span[0] <= c < span[1]]
            if idx:
                groups.append(idx)
    return list(trace), len(trace), groups


def fidelity(
    loaded, conds: list[Condition], probs: list[Problem], traces: dict, correct: dict, block: int, bar
) -> dict:
    """Teacher-forced on the unbounded traces: per condition, top-1 agreement and KL per token vs an
    unbounded session reading the same tokens, and the mean log-probability of a correct answer
    (summed over its tokens) where the unbounded run answered correctly (:func:`teacher_tokens`)."""
    out = {c.label: {"agree": [], "kl": [], "by_k": {}, "answer_logprob": []} for c in conds}
    out["unbounded"] = {"answer_logprob": []}
    for p in probs:
        prompt = prompt_ids(loaded, p)
        tail, n_trace, groups = teacher_tokens(loaded.tokenizer, traces[p.index], p, correct[p.index])
        group_of = {t: gi for gi, g in enumerate(groups) for t in g}
        seq = prompt + tail
        sessions = [AgentSession(model=loaded, max_kv_mb=None)] + [_session(loaded, c) for c in conds]
        for s in sessions[1:]:  # the question stays exact as when the session chats (pin_turn)
            if s.pins_turn(len(prompt)):
                s.pinned.append((0, len(prompt)))
        engines = [s.engine for s in sessions]
        answer_lp = [[0.0] * len(sessions) for _ in groups]
        for start in range(0, len(seq) - 1, block):
            chunk = seq[start : min(start + block, len(seq) - 1)]
            for e in engines:
                e.transcript_ids.extend(chunk)
            logits = forward_batch(engines, [chunk] * len(engines), [e.compactions for e in engines], keep="all")
            ks = [len(e.compactions) for e in engines]  # made before this block was read
            logp = torch.log_softmax(torch.stack(logits), dim=-1)  # (R, n, V)
            targets = torch.tensor(seq[start + 1 : start + 1 + len(chunk)])
            for i in range(len(chunk)):
                t = start + 1 + i - len(prompt)  # index in tail of the token predicted
                if t < 0:
                    continue
                if t in group_of:
                    lp = logp[:, i, targets[i]].tolist()
                    row = answer_lp[group_of[t]]
                    row[:] = [a + b for a, b in zip(row, lp)]
                if t < n_trace:  # the trace itself
                    ref = logp[0, i]
                    kl = (ref.exp() * (ref - logp[1:, i])).sum(-1).tolist()
                    top = (logp[1:, i].argmax(-1) == ref.argmax()).tolist()
                    for c, kl_c, top_c, k in zip(conds, kl, top, ks[1:]):
                        o = out[c.label]
                        o["kl"].append(kl_c)
                        o["agree"].append(float(top_c))
                        o["by_k"].setdefault(min(k, 6), []).append(kl_c)
        for row in answer_lp:
            out["unbounded"]["answer_logprob"].append(row[0])
            for c, lp in zip(conds, row[1:]):
                out[c.label]["answer_logprob"].append(lp)
        bar.update(1)
    summary = {}
    for label, o in out.items():
        row = {"answer_logprob": _mean(o["answer_logprob"]), "answers": len(o["answer_logprob"])}
        if "kl" in o:
            row.update(agreement=_mean(o["agree"]), kl=_mean(o["kl"]), tokens=len(o["kl"]))
            row["kl_by_compactions"] = {str(k): _mean(v) for k, v in sorted(o["by_k"].items())}
        summary[label] = row
    solved = [p.index for p in probs if any(correct[p.index])]
    return {"problems": [p.index for p in probs], "solved": solved, "block": block, "summary": summary}


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def summarize(run: dict, unbounded: dict) -> dict:
    """Accuracy over sub-problems, interval clustered by prompt, paired difference to unbounded."""
    correct = [r["correct"] for r in run["rows"]]
    base = [r["correct"] for r in unbounded["rows"]]
    n, k = sum(len(c) for c in correct), sum(sum(c) for c in correct)
    lo, hi = clustered_wilson(correct)
    d, dlo, dhi = paired_difference(correct, base)
    comp = [r["compactions"] for r in run["rows"]]
    n_prompts = len(run["rows"])
    same = sum(x == y for a, b in zip(run["rows"], unbounded["rows"]) for x, y in zip(a["answers"], b["answers"]))
    return {
        "condition": run["condition"],
        "method": run["method"],
        "budget_tokens": run["budget_tokens"],
        "n": n,
        "prompts": len(correct),
        "accuracy": k / n if n else 0.0,
        "interval": [lo, hi],
        "vs_unbounded": [d, dlo, dhi],
        "same_answer": same / max(1, n),
        "compactions_mean": sum(comp) / max(1, len(comp)),
        "compactions_min": min(comp, default=0),
        "forced": sum(r.get("forced", False) for r in run["rows"]),
        "question_pinned": sum(r.get("question_pinned", False) for r in run["rows"]) / max(1, n_prompts),
        "within_budget": all(r["within_budget"] for r in run["rows"]),
        "peak_kv_bytes": max(r["peak_kv_bytes"] for r in run["rows"]),
        "max_kv_bytes": run["rows"][0]["max_kv_bytes"] if run["rows"] else None,
        "tokens_per_s": run.get("tokens_per_s"),
        "compaction_share": run.get("compaction_share"),
    }


def run(args) -> dict:
    loaded = load_model(args.model, device=args.device)
    probs = problems(args.problems, args.seed, args.dataset, args.per_prompt)
    conds = [Condition(m, b, args.pin_turn) for b in args.budgets for m in args.methods]
    total = len(probs) * (1 + len(conds)) + len(probs) * len(args.budgets) + args.fidelity_problems
    bar = tqdm(total=total, desc="bench reasoning", unit="run", disable=args.no_progress)
    t0 = time.perf_counter()
    bar.set_postfix_str("unbounded")
    unbounded = decode(loaded, Condition("unbounded", None), probs, args.max_new_tokens, args.batch, bar)
    # later conditions run the problems in order of the unbounded run's length: batches end together
    order = sorted(probs, key=lambda p: len(unbounded["traces"][p.index]))
    runs = []
    for cond in conds:
        bar.set_postfix_str(cond.label)
        runs.append(decode(loaded, cond, order, args.max_new_tokens, args.batch, bar))
    for budget in args.budgets:
        am = next((r for r in runs if r["method"] == "am-halve" and r["budget_tokens"] == budget), None)
        if am is None:
            bar.update(len(probs))
            continue
        bar.set_postfix_str(f"cut @{budget}")
        halvings = {r["problem"]: r["compactions"] for r in am["rows"]}
        runs.append(effective_length(loaded, budget, unbounded, halvings, probs, bar))
    bar.set_postfix_str("fidelity")
    fid_probs = probs[: args.fidelity_problems]
    correct = {r["problem"]: r["correct"] for r in unbounded["rows"]}
    fid = None
    if fid_probs:
        fid = fidelity(loaded, conds, fid_probs, unbounded["traces"], correct, args.fidelity_block, bar)
    bar.close()
    summary = [summarize(unbounded, unbounded)] + [summarize(r, unbounded) for r in runs]
    for r in [unbounded, *runs]:
        r.pop("traces", None)
    sample = next(iter(unbounded["rows"]), None)
    return {
        "model": loaded.name,
        "dataset": args.dataset,
        "per_prompt": args.per_prompt,
        "pin_turn": args.pin_turn,
        "seed": args.seed,
        "problems": len(probs),
        "budgets_tokens": args.budgets,
        "budgets_mb": {b: budget_mb(loaded, b) for b in args.budgets},
        "bytes_per_token": AgentSession(model=loaded, max_kv_mb=None).cache.bytes_per_token(),
        "max_new_tokens": args.max_new_tokens,
        "batch": args.batch,
        "greedy": True,
        "summary": summary,
        "fidelity": fid,
        "runs": [unbounded, *runs],
        "sample": sample,
        "seconds": time.perf_counter() - t0,
        "environment": environment(str(loaded.device)),
    }


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="agentmem bench reasoning", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="qwen2.5-coder-0.5b")
    p.add_argument("--device", default=None)
    p.add_argument("--dataset", default="chain_sum", help="a reasoning-gym generator")
    p.add_argument("--per-prompt", type=int, default=6, help="problems per prompt, solved in turn (1: one problem)")
    p.add_argument("--seed", type=int, default=2026)
    p.add_argument("--problems", type=int, default=16, help="prompts (each of --per-prompt problems)")
    p.add_argument("--budgets", type=int, nargs="+", default=[256, 320], help="physical budgets L, in tokens")
    p.add_argument(
        "--pin-turn",
        type=float,
        default=0.75,
        help="AgentSession(pin_turn=...): the question stays exact while answered if it takes at most this share "
        "of the budget; 0 compacts it like everything else",
    )
    p.add_argument("--methods", nargs="+", default=METHODS)
    p.add_argument("--max-new-tokens", type=int, default=640)
    p.add_argument("--batch", type=int, default=24, help="sessions decoded in one batched call")
    p.add_argument("--fidelity-problems", type=int, default=12)
    p.add_argument("--fidelity-block", type=int, default=16)
    p.add_argument("--quick", action="store_true", help="a small smoke run (< 5 min)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--out", type=Path, default=Path("docs/benchmarks"))
    p.add_argument("--name", default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.problems, args.per_prompt, args.budgets, args.max_new_tokens = min(args.problems, 2), 2, [96], 48
        args.fidelity_problems, args.batch = min(args.fidelity_problems, 1), min(args.batch, 12)
    args.fidelity_problems = min(args.fidelity_problems, args.problems)
    args.name = args.name or ("reasoning_quick" if args.quick else "reasoning")
    return args


def main(argv: list[str] | None = None) -> int:
    from .reasoning_report import reasoning_plot, to_markdown

    return run_and_publish("reasoning", argv, parse_args, run, reasoning_plot, to_markdown)


if __name__ == "__main__":
    sys.exit(main())
