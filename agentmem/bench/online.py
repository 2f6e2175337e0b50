"""Online: one long greedy generation under a budget, compared token by token with an unbounded run.

A budgeted session generates greedily (ignoring end-of-sequence) and compacts as the budget
fills. An unbounded session with the same position handling is teacher-forced on exactly the same
tokens, in blocks. At every step both predict the next token; we report how often the unbounded
run's top-1 agrees with the token the budgeted run chose, and KL(unbounded || budgeted), per
segment and overall, for each policy, in one run.

    agentmem bench online [--tokens 20000] [--max-kv-mb 16] [--policies am-halve streaming]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from ..agent import AgentSession
from ..models import load_model
from .common import environment, write_report

PROMPT = (
    "The history of computing is a story of people trying to make machines remember. In this long essay we "
    "follow that story from the first mechanical calculators to modern language models, one chapter at a time.\n\n"
    "Chapter 1. The calculating engines\n\n"
)


def run_policy(
    loaded,
    policy: str,
    tokens: int,
    max_kv_mb: float,
    block: int,
    segment: int,
    verbose: bool = True,
    **session_kwargs,
) -> dict:
    """One policy's run (see the module docstring); ``session_kwargs`` go to the budgeted session
    (``max_work_mb``, ``budget_covers``)."""
    budget = AgentSession(model=loaded, max_kv_mb=max_kv_mb, policy=policy, **session_kwargs)
    full = AgentSession(model=loaded, max_kv_mb=None, policy="streaming")
    prompt = loaded.tokenizer(PROMPT)["input_ids"]
    budget.append_tokens(prompt)
    full.append_tokens(prompt)
    agree: list[float] = []
    kl: list[float] = []
    finite = True
    worst = 0
    t0 = time.perf_counter()
    gen_seconds = 0.0  # the budgeted session's own steps (compactions included), not the teacher-forced run
    generated = 0
    while generated < tokens:
        n = min(block, tokens - generated)
        fed = [budget.transcript_ids[-1]]  # the pending token both sessions run next
        b_logp = []
        for _ in range(n):
            t_step = time.perf_counter()
            logits = budget.next_logits()
            tok = int(torch.argmax(logits))
            budget.append_tokens([tok])
            gen_seconds += time.perf_counter() - t_step
            finite &= bool(torch.isfinite(logits).all())
            worst = max(worst, budget.cache.kv_bytes, budget.cache.peak_bytes)
            fed.append(tok)
            b_logp.append(torch.log_softmax(logits.float(), -1))
        f_logits = full.score(fed[1:], return_logits=True).logits  # teacher-forced on the same tokens
        full.append_tokens(fed[1:])
        f_logp = torch.log_softmax(f_logits.float(), -1)
        b_logp_t = torch.stack(b_logp)
        agree += (f_logp.argmax(-1) == torch.tensor(fed[1:])).float().tolist()
        kl += (f_logp.exp() * (f_logp - b_logp_t)).sum(-1).tolist()
        generated += n
        if verbose:
            print(
                f"[bench online] {policy}: {generated}/{tokens} tokens, agreement {sum(agree) / len(agree):.3f}, "
                f"{len(budget.compactions)} compactions, {time.perf_counter() - t0:.0f} s",
                file=sys.stderr,
            )
    segs = [
        (sum(agree[i : i + segment]) / len(agree[i : i + segment]), sum(kl[i : i + segment]) / len(kl[i : i + segment]))
        for i in range(0, len(agree), segment)
    ]
    st = budget.stats
    events = [e for e in st.compactions if e.reason == "budget"]
    span = round(sorted(e.span_tokens for e in events)[len(events) // 2]) if events else 0
    return {
        "policy": policy,
        "tokens": len(agree),
        "agreement": sum(agree) / len(agree),
        "kl": sum(kl) / len(kl),
        "segments": segs,
        "compactions": len(st.compactions),
        "finite": finite,
        "peak_kv_bytes": st.peak_kv_bytes,
        "max_kv_bytes": st.max_kv_bytes,
        "within_budget": worst <= st.max_kv_bytes,
        "physical_tokens": st.physical_tokens,
        "logical_tokens": st.logical_tokens,
        "compaction_seconds": sum(e.seconds for e in st.compactions),
        "generation_seconds": gen_seconds,
        "tokens_per_second": len(agree) / gen_seconds,
        "compaction_share": sum(e.seconds for e in st.compactions) / gen_seconds,
        "halving_seconds": sorted(e.seconds for e in events)[len(events) // 2] if events else None,
        "span_tokens": span,
        "span_prefill_seconds": _prefill_seconds(loaded, list(budget.transcript_ids), span) if span else None,
        "phases": {p: sum(e.phases.get(p, 0.0) for e in events) for p in {p for e in events for p in e.phases}},
        "peak_work_bytes": st.peak_work_bytes,
        "max_work_bytes": st.max_work_bytes,
        "budget_bytes": st.budget_bytes,
        "budget_covers": st.budget_covers,
        "peak_undo_bytes": st.peak_undo_bytes,
        "query_buffer_bytes": st.query_buffer_bytes,
        "seconds": time.perf_counter() - t0,
        "sample": loaded.tokenizer.decode(list(budget.transcript_ids)[len(prompt) : len(prompt) + 300]),
    }


def _prefill_seconds(loaded, ids: list[int], n: int, repeats: int = 3) -> float:
    """Median seconds to read n tokens after as many (a prefill the size of a compacted span, at a
    context length like the budget's)."""
    times = []
    for _ in range(repeats):
        s = AgentSession(model=loaded, max_kv_mb=None, policy="streaming")
        s.append_tokens(ids[:n])
        tail = ids[n : 2 * n] if len(ids) >= 2 * n else ids[:n]
        t0 = time.perf_counter()
        s.append_tokens(tail)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def _k(n: int) -> str:
    return f"{n / 1000:g}k" if n >= 1000 else str(n)


def to_markdown(data: dict, command: str) -> str:
    seg = data["segment"]
    n_seg = len(data["results"][0]["segments"])
    head = " | ".join(f"{_k(i * seg)}-{_k(min((i + 1) * seg, data['tokens']))}" for i in range(n_seg))
    lines = [
        f"# Online: {data['tokens']:,} greedy tokens under `max_kv_mb={data['max_kv_mb']}`",
        "",
        f"Model `{data['model']}`. Each policy generates greedily (end-of-sequence ignored) from the same prompt; "
        "an unbounded session (same position handling) is teacher-forced on the same tokens. Agreement: how often "
        "the unbounded run's top-1 equals the budgeted run's token; KL(unbounded || budgeted) per token. "
        "Per segment: agreement / KL.",
        "",
        f"| policy | agreement | KL | {head} | compactions | peak KiB / budget KiB | all finite |",
        "|---|---:|---:|" + "---:|" * n_seg + "---:|---:|---|",
    ]
    for r in data["results"]:
        segs = " | ".join(f"{a:.2f} / {k:.2f}" for a, k in r["segments"])
        lines.append(
            f"| `{r['policy']}` | **{r['agreement']:.3f}** | {r['kl']:.3f} | {segs} | {r['compactions']} | "
            f"{r['peak_kv_bytes'] // 1024} / {r['max_kv_bytes'] // 1024} | {r['finite']} |"
        )
    base = next((r for r in data["results"] if r["policy"] == "streaming"), None)
    if all("generation_seconds" in r for r in data["results"]):
        lines += [
            "",
            "## Time",
            "",
            "The budgeted session's own steps only (the teacher-forced run is not counted). *Compacting*: share of "
            "that time spent in compactions. *Halving*: median seconds of one budget compaction, and as a multiple of "
            "the time to read as many tokens as it compacted (per layer and KV head) after as many, measured in the "
            "same run. Tokens/s ratio: against `streaming` in the same run.",
            "",
            "| policy | tokens/s | vs streaming | compacting | halving | span tokens | vs its prefill | peak work KiB "
            "| query buffer KiB |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in data["results"]:
            ratio = f"{r['tokens_per_second'] / base['tokens_per_second']:.2f}" if base else "-"
            halving = f"{r['halving_seconds'] * 1e3:.0f} ms" if r["halving_seconds"] is not None else "-"
            cost = f"{r['halving_seconds'] / r['span_prefill_seconds']:.2f}x" if r["span_prefill_seconds"] else "-"
            lines.append(
                f"| `{r['policy']}` | {r['tokens_per_second']:.1f} | {ratio} | {r['compaction_share']:.1%} | "
                f"{halving} | {r['span_tokens']} | {cost} | {r['peak_work_bytes'] // 1024} | "
                f"{r['query_buffer_bytes'] // 1024} |"
            )
    lines += ["", f"Command: `{command}`", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="agentmem bench online", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--tokens", type=int, default=20000)
    p.add_argument("--max-kv-mb", type=float, default=16.0)
    p.add_argument("--policies", nargs="+", default=["am-halve", "streaming"])
    p.add_argument("--block", type=int, default=256)
    p.add_argument("--segment", type=int, default=2500)
    p.add_argument("--out", type=Path, default=Path("docs/benchmarks"))
    p.add_argument("--name", default="online")
    argv = sys.argv[1:] if argv is None else argv
    args = p.parse_args(argv)
    torch.manual_seed(0)
    loaded = load_model(args.model)
    results = [run_policy(loaded, pol, args.tokens, args.max_kv_mb, args.block, args.segment) for pol in args.policies]
    data = {
        "model": loaded.name,
        "tokens": args.tokens,
        "max_kv_mb": args.max_kv_mb,
        "segment": args.segment,
        "environment": environment(str(loaded.device)),
        "results": results,
    }
    command = ("agentmem bench online " + " ".join(argv)).strip()
    write_report(args.out, args.name, data, to_markdown(data, command))
    print(to_markdown(data, command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
