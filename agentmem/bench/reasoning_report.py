"""The report of ``agentmem bench reasoning``: markdown tables and a two-panel plot."""

from __future__ import annotations

from pathlib import Path


def _pct(x: float) -> str:
    return f"{100 * x:.0f}"


def _lp(row: dict) -> str:
    return "-" if row.get("answer_logprob") is None else f"{row['answer_logprob']:.2f}"


def to_markdown(data: dict, plot_name: str) -> str:
    n, k = data["problems"], data.get("per_prompt", 1)
    mbs = ", ".join(f"L={b} tokens = {float(mb):.2f} MiB" for b, mb in data["budgets_mb"].items())
    what = f"{n} prompts of {k} `{data['dataset']}` problems" if k > 1 else f"{n} `{data['dataset']}` problems"
    lines = [
        f"# Reasoning under a fixed KV budget: `{data['model']}`, {what}",
        "",
        f"Greedy decoding, at most {data['max_new_tokens']} new tokens; every condition solves the same seeded "
        f"problems (seed {data['seed']}) at the same physical budget ({mbs}; {data['bytes_per_token']:,} bytes "
        "of KV a token). "
        + (
            f"Each prompt asks for {k} problems to be solved in turn, each answer in its own box: problem j has "
            "to be read back from memory after the work on the problems before it. Accuracy counts problems, "
            "its 95% interval is clustered by prompt. "
            if k > 1
            else "A run that reaches the limit without an answer is forced to give one. "
        )
        + f"The user turn stays exact while it is answered when it takes at most {data.get('pin_turn', 0.5):g} of "
        "the budget and leaves the policy room to work (`AgentSession(pin_turn=...)`; *question pinned*: share of "
        "prompts where it did); otherwise it is compacted like everything else. "
        + "`cut @L`: the unbounded run cut at L(1 + k/2) tokens, k = the halvings `am-halve` made on that "
        "prompt (the paper's effective-length view; where that is beyond a trace's end the cut changes nothing). "
        "*vs unbounded*: the paired difference on the same problems "
        "(95% interval); *same answer*: share of problems answered exactly as the unbounded run did; "
        f"tok/s: batched decode ({min(data['batch'], data['problems'])} sessions per call) including compaction time; "
        "*compacting*: share of that time spent compacting.",
        "",
        f"![accuracy vs budget]({plot_name})",
        "",
        "| condition | accuracy % [95% CI] | vs unbounded, points [95% CI] | same answer | compactions / prompt "
        "(min) | question pinned | forced | peak KiB / budget KiB | tok/s | compacting |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in data["summary"]:
        lo, hi = s["interval"]
        d, dlo, dhi = s["vs_unbounded"]
        budget = f"{s['peak_kv_bytes'] // 1024:,} / {s['max_kv_bytes'] // 1024:,}" if s["max_kv_bytes"] else "-"
        tps = f"{s['tokens_per_s']:.1f}" if s.get("tokens_per_s") else "-"
        share = f"{100 * s['compaction_share']:.0f}%" if s.get("compaction_share") is not None else "-"
        name = f"**{s['condition']}**" if s["method"] == "am-halve" else s["condition"]
        pinned = "-" if not s["max_kv_bytes"] else f"{_pct(s.get('question_pinned', 0))}%"
        lines.append(
            f"| {name} | {_pct(s['accuracy'])} [{_pct(lo)}, {_pct(hi)}] | {100 * d:+.0f} [{100 * dlo:+.0f}, "
            f"{100 * dhi:+.0f}] | {_pct(s['same_answer'])}% | {s['compactions_mean']:.1f} ({s['compactions_min']}) | "
            f"{pinned} | {s['forced']} | {budget} | {tps} | {share} |"
        )
    fid = data.get("fidelity")
    if fid:
        ks = sorted({k for row in fid["summary"].values() for k in row.get("kl_by_compactions", {})}, key=int)
        head = " | ".join(f"KL after {k}{'+' if k == '6' else ''}" for k in ks)
        lines += [
            "",
            f"## Teacher-forced fidelity on the unbounded traces ({len(fid['problems'])} prompts, blocks of "
            f"{fid['block']} tokens)",
            "",
            "Each condition reads the unbounded run's own reasoning next to an unbounded session; top-1 "
            "agreement and KL(unbounded || condition) per trace token, KL by the number of compactions made "
            "so far, and the mean log-probability of a correct answer (summed over its tokens) where the "
            f"unbounded run answered correctly ({fid['summary']['unbounded'].get('answers', 0)} answers).",
            "",
            f"| condition | top-1 agreement | KL | {head} | log p(correct answer) |",
            "|---|---:|---:|" + "---:|" * len(ks) + "---:|",
        ]
        for label, row in fid["summary"].items():
            if label == "unbounded":
                continue
            by_k = row.get("kl_by_compactions", {})
            cells = " | ".join(f"{by_k[k]:.3f}" if k in by_k else "-" for k in ks)
            lines.append(f"| {label} | {row['agreement']:.3f} | {row['kl']:.3f} | {cells} | {_lp(row)} |")
        ref = fid["summary"]["unbounded"]
        lines.append("| unbounded | 1 | 0 | " + " | ".join("0" for _ in ks) + f" | {_lp(ref)} |")
    sample = data.get("sample")
    env = data["environment"]
    lines += [
        "",
        f"Machine: {env['cpu_count']} CPU cores ({env['device']}, {env['torch_threads']} torch threads), torch "
        f"{env['torch']}, transformers {env['transformers']}; the whole run took {data['seconds'] / 60:.1f} min.",
    ]
    if sample:
        lines.append(f"First prompt: gold {sample['gold']}, unbounded answers {sample['answers']}.")
    lines += ["", f"Command: `{data['command']}`", ""]
    return "\n".join(lines)


def reasoning_plot(data: dict, path: Path) -> Path:
    """Left: accuracy vs physical budget, a line per method, unbounded as a horizontal band.
    Right: teacher-forced KL by the number of compactions so far, a line per condition."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.6))
    rows = data["summary"]
    ref = next(r for r in rows if r["method"] == "unbounded")
    ax.axhline(100 * ref["accuracy"], color="gray", linewidth=1.5, label="unbounded")
    ax.axhspan(100 * ref["interval"][0], 100 * ref["interval"][1], color="gray", alpha=0.12)
    for method in dict.fromkeys(r["method"] for r in rows if r["method"] != "unbounded"):
        pts = sorted((r["budget_tokens"], r) for r in rows if r["method"] == method)
        x = [b for b, _ in pts]
        y = [100 * r["accuracy"] for _, r in pts]
        err = [
            [100 * (r["accuracy"] - r["interval"][0]) for _, r in pts],
            [100 * (r["interval"][1] - r["accuracy"]) for _, r in pts],
        ]
        style = {"color": "black", "linewidth": 2.5, "zorder": 5} if method == "am-halve" else {"linewidth": 1.2}
        ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=method, **style)
    ax.set_xlabel("physical KV budget L (tokens)")
    ax.set_ylabel("accuracy (%)")
    k = data.get("per_prompt", 1)
    ax.set_title(f"{data['model']}: {data['problems']} x {k} {data['dataset']} problems")
    ax.legend(fontsize=8)
    fid = data.get("fidelity")
    if fid:
        for label, row in fid["summary"].items():
            by_k = row.get("kl_by_compactions")
            if not by_k:
                continue
            ks = sorted(by_k, key=int)
            style = {"color": "black", "linewidth": 2.5} if label.startswith("am-halve") else {"linewidth": 1.0}
            bx.plot([int(k) for k in ks], [max(by_k[k], 1e-5) for k in ks], marker="o", label=label, **style)
        bx.set_yscale("log")
        bx.set_xlabel("compactions so far (6 = 6 or more)")
        bx.set_ylabel("KL(unbounded || condition), nats/token")
        bx.set_title("teacher-forced on the unbounded traces")
        bx.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
