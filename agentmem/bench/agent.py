"""Tool outputs an agent can still use after compaction, judged on exact answers.

An agent session (system prompt pinned, a user task, the assistant's tool call) reads a tool output
(bench/tooloutputs.py: ``pytest -v``, ``git log``, a JSON listing, a deploy log, ``cat -n`` of a
real source file; about ``--tokens`` tokens each) with ``tool_result``, the model answers the task
in a further turn, and then each planted fact is asked as a new chat turn, with no answer prefix;
a fact counts when its exact string appears in the greedy reply. Conditions, all on the same
model (default ``qwen2.5-coder-0.5b``):

* ``full``: the output read, nothing compacted (the reference);
* ``<method> @r``: the output compacted on arrival to ratio r (``--ratios``) by the offline path of
  each policy of ``--methods``: AM (``am-halve``: repeat-prefill queries, per-context head budgets),
  ``kvzip``, ``snapkv``, ``h2o``, ``streaming`` (keeps the output's end), ``truncate``;
* ``<method> @r + recall``: the same, and before each question the agent calls
  ``session.recall(question)``, which reads the matching lines of the output back exactly from the
  transcript (agentmem/recall.py);
* ``<method> budget`` (``--budget``): read under a KV budget of half the output (compacted online
  while it is read, then to the policy's ``tool_ratio``), for the online path.

Accuracy with a 95% Wilson interval (facts of one output share a fate; the interval is clustered by
output), the ratio to the full cache's accuracy, and seconds spent compacting.

    agentmem bench agent [--quick] [--tokens 1000 3000] [--ratios 0.5 0.25 0.1] [--methods ...]
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from ..agent import AgentSession
from ..batch import generate_batch
from ..errors import AgentMemError
from ..models import load_model
from ..recall import RECALL_TOOL
from ..units import MiB
from .common import environment, policy_of, run_and_publish
from .problems import clustered_wilson, paired_difference
from .tooloutputs import GENERATORS, ToolOutput, tool_output

SYSTEM = "You are a coding agent. You run tools and answer questions about their output exactly and briefly."
METHODS = ["am-halve", "kvzip", "snapkv", "h2o", "streaming", "truncate"]
RECALL_METHODS = ["am-halve", "streaming"]


@dataclass(frozen=True)
class Condition:
    method: str  # "full" or a policy name
    ratio: float | None  # compaction of the output on arrival (None: the full output, or the budget's own)
    recall: str | None = None  # "call": the agent calls session.recall(question); "tool": the model may
    budget: bool = False  # read under a budget of half the output

    @property
    def label(self) -> str:
        if self.method == "full":
            return "full"
        what = " budget" if self.budget else "" if self.ratio is None else f" @{self.ratio:g}"
        return f"{self.method}{what}" + {None: "", "call": " + recall", "tool": " + recall tool"}[self.recall]


def _tool_call(out: ToolOutput) -> dict:
    return {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": out.tool, "arguments": {"command": out.command}},
            }
        ],
    }


def _session(
    loaded, out: ToolOutput, policy: str, budget_tokens: int | None, recall_tool: bool = False
) -> AgentSession:
    """A session that has read the system prompt, the task and the assistant's tool call."""
    mb = None
    if budget_tokens is not None:
        mb = AgentSession(model=loaded, max_kv_mb=None).cache.bytes_for_tokens(budget_tokens) / MiB
    s = AgentSession(model=loaded, max_kv_mb=mb, policy=policy_of(policy))
    if recall_tool:
        s.tools = [RECALL_TOOL]
    s.append(SYSTEM, role="system", pin=True)
    _ask(s, out, f"Please run `{out.command}` and tell me what you find.")
    return s


def _ask(s: AgentSession, out: ToolOutput, task: str) -> None:
    """The user's task and the assistant's call of the tool that prints ``out``."""
    s.read_messages([{"role": "user", "content": task}])
    try:
        s.read_messages([_tool_call(out)])
    except AgentMemError:  # a template without tool calls: the call as plain text
        s.read_messages([{"role": "assistant", "content": f"Running `{out.command}`."}])


def _answers(session: AgentSession, out: ToolOutput, recall: str | None, max_new: int) -> list[dict]:
    """Each fact asked on its own fork, greedy: in one batch, after ``session.recall(question)`` with
    ``recall="call"``; one by one with ``recall="tool"`` (the model may call recall first)."""
    forks, rows = [], []
    for fact in out.facts:
        f = session.fork()
        recalled = f.recall(fact.question) if recall == "call" else None
        forks.append(f)
        rows.append({"question": fact.question, "gold": fact.answer, "recalled": bool(recalled and recalled.found)})
    if recall == "tool":
        results = []
        for f, row in zip(forks, rows):
            n = len(f.messages)
            results.append(f.chat(row["question"], max_new_tokens=max_new + 24, tool_rounds=1))
            row["recalled"] = any(m.get("name") == "recall" for m in f.messages[n:])
    else:
        prompts = [[{"role": "user", "content": r["question"]}] for r in rows]
        results = generate_batch(forks, prompts, max_new_tokens=max_new)
    for row, r in zip(rows, results):
        row["reply"] = r.text
        row["correct"] = row["gold"] in r.text
    return rows


def run_output(loaded, out: ToolOutput, conds: list[Condition], args, bar: tqdm) -> list[dict]:
    """Every condition on one tool output. Sessions of one policy read the output once, unbounded,
    and each ratio compacts a fork of it (what ``tool_result(ratio=r)`` does in one call)."""
    rows = []
    tokens = len(loaded.tokenizer(out.text, add_special_tokens=False)["input_ids"])
    by_policy: dict[tuple[str, bool], list[Condition]] = {}
    for c in conds:
        by_policy.setdefault(("am-halve" if c.method == "full" else c.method, c.recall == "tool"), []).append(c)
    for (policy, recall_tool), group in by_policy.items():
        base, receipt = None, None
        for c in group:
            t0 = time.perf_counter()
            if c.budget:
                s = _session(loaded, out, policy, max(64, tokens // 2))
                receipt = s.tool_result(out.tool, out.text)
                compacted = receipt.compactions
            else:
                if base is None:
                    base = _session(loaded, out, policy, None, recall_tool)
                    receipt = base.tool_result(out.tool, out.text, ratio=1.0)
                s = base.fork()
                event = None if c.ratio in (None, 1.0) else s.compact(c.ratio, span=receipt.span, reason="tool")
                compacted = int(event is not None)
            seconds = time.perf_counter() - t0
            entries = _span_entries(s, receipt.span)
            reply = s.chat([], max_new_tokens=args.reply_tokens)  # the agent's turn after the output
            facts = _answers(s, out, c.recall, args.answer_tokens)
            rows.append(
                {
                    "condition": c.label,
                    "method": c.method,
                    "ratio": c.ratio,
                    "recall": c.recall,
                    "budget": c.budget,
                    "output": f"{out.kind}/{tokens}",
                    "tokens": tokens,
                    "entries": entries,
                    "compactions": compacted,
                    "seconds": seconds,
                    "peak_kv_bytes": s.stats.peak_kv_bytes,
                    "max_kv_bytes": s.stats.max_kv_bytes,
                    "reply": reply.text,
                    "facts": facts,
                }
            )
            bar.update(1)
    return rows


def agent_loop(loaded, condition: Condition, seed: int, args) -> dict:
    """Six tool calls in one session under a budget: each output (about ``--loop-tokens`` tokens,
    kinds in turn) is compacted on arrival (the policy's ``tool_ratio``) and the agent takes a
    short turn after it; the budget holds about 1.5 outputs, so older outputs are compacted again
    online as the loop goes on. Then facts of the first, the third and the last output are asked
    (with ``recall``: after ``session.recall(question)``); scored on those final answers."""
    kinds = list(GENERATORS)
    outs = [
        tool_output(kinds[(seed + i) % len(kinds)], args.loop_tokens, 1000 * seed + i, loaded.tokenizer)
        for i in range(6)
    ]
    full = condition.method == "full"
    budget = None if full else int(1.5 * args.loop_tokens) + 256
    s = _session(loaded, outs[0], "am-halve" if full else condition.method, budget, condition.recall == "tool")
    t0 = time.perf_counter()
    for i, out in enumerate(outs):
        if i:
            _ask(s, out, f"Now run `{out.command}`.")
        s.tool_result(out.tool, out.text, ratio=1.0 if full else None)
        s.chat([], max_new_tokens=12)
    seconds = time.perf_counter() - t0
    asked = [(0, outs[0]), (2, outs[2]), (5, outs[5])]
    facts = []
    for step, out in asked:
        fact = out.facts[seed % len(out.facts)]
        one = ToolOutput(out.kind, out.tool, out.command, out.text, [fact])
        row = _answers(s, one, condition.recall, args.answer_tokens)[0]
        row["step"] = step + 1
        facts.append(row)
    st = s.stats
    return {
        "condition": condition.label,
        "method": condition.method,
        "recall": condition.recall,
        "seed": seed,
        "facts": facts,
        "compactions": len(st.compactions),
        "seconds": seconds,
        "peak_kv_bytes": st.peak_kv_bytes,
        "max_kv_bytes": st.max_kv_bytes,
    }


def _span_entries(s: AgentSession, span: tuple[int, int]) -> float:
    from ..tools import span_entries

    return span_entries(s.cache, *span)


def summarize(rows: list[dict]) -> list[dict]:
    full = {r["output"]: [f["correct"] for f in r["facts"]] for r in rows if r["method"] == "full"}
    out = []
    for label in dict.fromkeys(r["condition"] for r in rows):
        mine = [r for r in rows if r["condition"] == label]
        groups = [[f["correct"] for f in r["facts"]] for r in mine]
        base = [full[r["output"]] for r in mine]
        n, k = sum(len(g) for g in groups), sum(sum(g) for g in groups)
        ref = sum(sum(g) for g in base)
        lo, hi = clustered_wilson(groups)
        d, dlo, dhi = paired_difference(groups, base)
        out.append(
            {
                "condition": label,
                "method": mine[0]["method"],
                "ratio": mine[0]["ratio"],
                "recall": mine[0]["recall"],
                "budget": mine[0]["budget"],
                "n": n,
                "accuracy": k / n if n else 0.0,
                "interval": [lo, hi],
                "vs_full": k / ref if ref else None,
                "difference": [d, dlo, dhi],
                "kept": sum(r["entries"] for r in mine) / max(1, sum(r["tokens"] for r in mine)),
                "seconds": sum(r["seconds"] for r in mine) / len(mine),
                "within_budget": all(_within(r) for r in mine),
            }
        )
    return out


def summarize_loops(loops: list[dict]) -> list[dict]:
    out = []
    for label in dict.fromkeys(r["condition"] for r in loops):
        mine = [r for r in loops if r["condition"] == label]
        groups = [[f["correct"] for f in r["facts"]] for r in mine]
        n, k = sum(len(g) for g in groups), sum(sum(g) for g in groups)
        lo, hi = clustered_wilson(groups)
        by_step = {}
        for r in mine:
            for f in r["facts"]:
                by_step.setdefault(f["step"], []).append(f["correct"])
        out.append(
            {
                "condition": label,
                "method": mine[0]["method"],
                "recall": mine[0]["recall"],
                "n": n,
                "accuracy": k / n if n else 0.0,
                "interval": [lo, hi],
                "by_step": {str(st): sum(v) / len(v) for st, v in sorted(by_step.items())},
                "compactions": sum(r["compactions"] for r in mine) / len(mine),
                "within_budget": all(_within(r) for r in mine),
            }
        )
    return out


def _within(row: dict) -> bool:
    return row["max_kv_bytes"] is None or row["peak_kv_bytes"] <= row["max_kv_bytes"]


def conditions(args) -> list[Condition]:
    conds = [Condition("full", None)]
    for r in args.ratios:
        conds += [Condition(m, r) for m in args.methods]
        conds += [Condition(m, r, recall="call") for m in args.recall_methods if m in args.methods]
        conds += [Condition(m, r, recall="tool") for m in args.recall_tool_methods if m in args.methods]
    if args.budget:
        conds += [Condition(m, None, budget=True) for m in args.methods]
        conds += [Condition(m, None, recall="call", budget=True) for m in args.recall_methods if m in args.methods]
    return conds


def run(args) -> dict:
    loaded = load_model(args.model, device=args.device)
    outputs = [
        tool_output(kind, tokens, args.seed + i, loaded.tokenizer)
        for i, kind in enumerate(args.kinds)
        for tokens in args.tokens
    ]
    conds = conditions(args)
    bar = tqdm(total=len(outputs) * len(conds), desc="bench agent", unit="run", disable=args.no_progress)
    t0 = time.perf_counter()
    rows = []
    for out in outputs:
        bar.set_postfix_str(out.kind)
        rows += run_output(loaded, out, conds, args, bar)
    order = {c.label: i for i, c in enumerate(conds)}
    rows.sort(key=lambda r: order[r["condition"]])  # run grouped by policy, reported in condition order
    loops = []
    if args.loops:
        lconds = [Condition("full", None)] + [Condition(m, None) for m in args.methods]
        lconds += [Condition(m, None, recall="call") for m in args.recall_methods if m in args.methods]
        bar.reset(total=args.loops * len(lconds))
        bar.set_postfix_str("agent loop")
        for seed in range(args.loops):
            for c in lconds:
                loops.append(agent_loop(loaded, c, seed, args))
                bar.update(1)
    bar.close()
    return {
        "loops": loops,
        "loop_summary": summarize_loops(loops),
        "loop_tokens": args.loop_tokens,
        "model": loaded.name,
        "outputs": [{"kind": o.kind, "command": o.command, "facts": len(o.facts)} for o in outputs],
        "tokens": args.tokens,
        "ratios": args.ratios,
        "seed": args.seed,
        "summary": summarize(rows),
        "rows": rows,
        "seconds": time.perf_counter() - t0,
        "environment": environment(str(loaded.device)),
    }


def to_markdown(data: dict, plot: str | None) -> str:
    lines = [
        f"# Tool outputs after compaction: `{data['model']}`, exact answers",
        "",
        f"{len(data['outputs'])} tool outputs ({', '.join(sorted({o['kind'] for o in data['outputs']}))}; "
        f"about {' / '.join(str(t) for t in data['tokens'])} tokens), {sum(o['facts'] for o in data['outputs'])} "
        "planted facts asked after the output was read and the agent took a turn; a fact counts when its exact "
        "string is in the greedy reply. 95% intervals clustered by output.",
        "",
    ]
    if plot:
        lines += [f"![accuracy vs ratio]({plot})", ""]
    lines += [
        "| condition | accuracy % [95% CI] | x full | vs full, points [95% CI] | entries kept | seconds |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for s in data["summary"]:
        lo, hi = s["interval"]
        d, dlo, dhi = s["difference"]
        vs = "-" if s["vs_full"] is None else f"{s['vs_full']:.2f}"
        name = f"**{s['condition']}**" if s["method"] == "am-halve" else s["condition"]
        lines.append(
            f"| {name} | {100 * s['accuracy']:.0f} [{100 * lo:.0f}, {100 * hi:.0f}] | {vs} | {100 * d:+.0f} "
            f"[{100 * dlo:+.0f}, {100 * dhi:+.0f}] | {s['kept']:.2f} | {s['seconds']:.1f} |"
        )
    lines += _by_kind(data)
    if data.get("loop_summary"):
        lines += [
            "",
            f"## Multi-step agent loop ({len(data['loops']) // max(1, len(data['loop_summary']))} loops per condition)",
            "",
            f"Six tool calls of about {data['loop_tokens']} tokens each in one session, each output compacted on "
            "arrival, under a budget of about 1.5 outputs (the full condition: no budget, nothing compacted); "
            "then one fact each of outputs 1, 3 and 6 is asked.",
            "",
            "| condition | accuracy % [95% CI] | output 1 | output 3 | output 6 | compactions |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for s in data["loop_summary"]:
            lo, hi = s["interval"]
            st = s["by_step"]
            cells = " | ".join(f"{100 * st[k]:.0f}" if k in st else "-" for k in ("1", "3", "6"))
            lines.append(
                f"| {s['condition']} | {100 * s['accuracy']:.0f} [{100 * lo:.0f}, {100 * hi:.0f}] | {cells} | "
                f"{s['compactions']:.1f} |"
            )
    env = data["environment"]
    lines += [
        "",
        f"Machine: {env['cpu_count']} CPU cores ({env['device']}, {env['torch_threads']} torch threads), torch "
        f"{env['torch']}, transformers {env['transformers']}; the whole run took {data['seconds'] / 60:.1f} min.",
        "",
        f"Command: `{data['command']}`",
        "",
    ]
    return "\n".join(lines)


def _by_kind(data: dict) -> list[str]:
    """Accuracy per condition and kind of output (where lookups fail)."""
    kinds = sorted({o["kind"] for o in data["outputs"]})
    cells: dict[str, dict[str, list[bool]]] = {}
    for r in data["rows"]:
        kind = r["output"].split("/")[0]
        cells.setdefault(r["condition"], {}).setdefault(kind, []).extend(f["correct"] for f in r["facts"])
    lines = ["", "### By kind of output (exact answers, %)", "", "| condition | " + " | ".join(kinds) + " |"]
    lines.append("|---|" + "---:|" * len(kinds))
    for label, by in cells.items():
        row = [f"{100 * sum(by[k]) / len(by[k]):.0f}" if by.get(k) else "-" for k in kinds]
        lines.append(f"| {label} | " + " | ".join(row) + " |")
    return lines


def agent_plot(data: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.4))
    rows = data["summary"]
    full = next(r for r in rows if r["method"] == "full")
    ax.axhline(100 * full["accuracy"], color="gray", linewidth=1.5, label="full cache")
    for (method, recall), style in _styles(rows).items():
        pts = sorted(
            (r["ratio"], r) for r in rows if r["method"] == method and r["recall"] == recall and not r["budget"]
        )
        if pts:
            ax.plot([x for x, _ in pts], [100 * r["accuracy"] for _, r in pts], marker="o", **style)
    ax.set_xscale("log")
    ax.set_xlabel("share of the output's entries kept")
    ax.set_ylabel("exact answers (%)")
    ax.set_title(f"{data['model']}: facts asked after compaction")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _styles(rows: list[dict]) -> dict:
    out = {}
    for r in rows:
        if r["method"] == "full":
            continue
        key = (r["method"], r["recall"])
        label = r["method"] + {None: "", "call": " + recall", "tool": " + recall tool"}[r["recall"]]
        style = {"label": label, "linewidth": 1.2}
        if r["method"] == "am-halve":  # drawn over the others (kvzip often lies on the same points)
            style.update(color="black", linewidth=2.5 if not r["recall"] else 2.0, zorder=5)
        if r["recall"]:
            style["linestyle"] = "--" if r["recall"] == "call" else ":"
        out.setdefault(key, style)
    return out


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="agentmem bench agent", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="qwen2.5-coder-0.5b")
    p.add_argument("--device", default=None)
    p.add_argument("--kinds", nargs="+", default=list(GENERATORS), choices=list(GENERATORS))
    p.add_argument("--tokens", type=int, nargs="+", default=[1000, 3000], help="tool output sizes")
    p.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.25, 0.1])
    p.add_argument("--methods", nargs="+", default=METHODS)
    p.add_argument("--recall-methods", nargs="*", default=RECALL_METHODS, help="also run these with recall")
    p.add_argument(
        "--recall-tool-methods", nargs="*", default=["am-halve"], help="also run these offering the model recall"
    )
    p.add_argument("--budget", action="store_true", help="also read each output under a budget of half its size")
    p.add_argument("--seed", type=int, default=2026)
    p.add_argument("--loops", type=int, default=4, help="multi-step agent loops per condition (0: none)")
    p.add_argument("--loop-tokens", type=int, default=500, help="size of each tool output in a loop")
    p.add_argument("--reply-tokens", type=int, default=32, help="the agent's turn after the output")
    p.add_argument("--answer-tokens", type=int, default=24)
    p.add_argument("--quick", action="store_true", help="a small smoke run (< 5 min)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--out", type=Path, default=Path("docs/benchmarks"))
    p.add_argument("--name", default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.kinds, args.tokens, args.ratios, args.loops, args.loop_tokens = ["deploy_log"], [400], [0.25], 1, 200
        args.methods, args.recall_methods, args.recall_tool_methods = ["am-halve", "streaming"], ["am-halve"], []
    args.name = args.name or ("agent_quick" if args.quick else "agent")
    return args


def main(argv: list[str] | None = None) -> int:
    return run_and_publish("agent", argv, parse_args, run, agent_plot, to_markdown)


if __name__ == "__main__":
    sys.exit(main())
