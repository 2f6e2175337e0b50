"""Memory beside the cache: what a compaction holds next to the KV it compacts, with and without a bound.

Offline: ``session.compact(0.5)`` with the default policy of the first N tokens of ``argparse.py``,
unbounded and with ``max_work_mb`` set to fractions of that context's KV bytes. Per setting: the
work estimate (``CompactionEvent.work_bytes``), the rise of the process's peak resident memory over
its level right before the compaction (Linux VmHWM, reset first), time as a multiple of the same
session's prefill, and quality against the uncompacted context (KL of the next tokens' distributions,
NLL change of reproducing an earlier passage).

Online: one greedy generation per setting under one ``max_kv_mb``, with ``budget_covers="kv"``
and ``"all"`` (and ``"kv"`` at the cache share ``"all"`` leaves), against an unbounded run
(bench online's method): KL, agreement, tokens/s, and every byte beside the cache.

    agentmem bench memory [--contexts 2048 4096] [--bounds 0.5 0.25] [--online-tokens 1000] [--max-kv-mb 32]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from ..agent import AgentSession
from ..models import load_model
from ..units import MiB
from .common import environment, find_document, write_report
from .online import run_policy
from .quality import _kl, copy_span


def _status(field: str) -> int:
    """A /proc/self/status figure in bytes (0 where there is none)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _reset_peak() -> bool:
    """Reset VmHWM to the current resident size (Linux); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def offline_row(loaded, ids: list[int], cont: list[int], bound: float | None, ref) -> dict:
    """compact(0.5) of ``ids`` with ``max_work_mb`` = ``bound`` x the context's KV bytes (None: unbounded)."""
    probe = AgentSession(model=loaded, max_kv_mb=None)
    kv = probe.cache.bytes_for_tokens(len(ids))
    del probe
    work_mb = None if bound is None else bound * kv / MiB
    s = AgentSession(model=loaded, max_kv_mb=None, max_work_mb=work_mb)
    t0 = time.perf_counter()
    s.append_tokens(ids)
    prefill = time.perf_counter() - t0
    kv_before = s.stats.kv_bytes
    measured = _reset_peak()
    rss = _status("VmRSS")
    t0 = time.perf_counter()
    event = s.compact(0.5)
    seconds = time.perf_counter() - t0
    peak = _status("VmHWM") - rss if measured else None
    a, b = copy_span(len(ids))
    scored = s.score(cont, return_logits=True)
    return {
        "context": len(ids),
        "bound": bound,
        "max_work_bytes": s.stats.max_work_bytes,
        "kv_bytes_before": kv_before,
        "kv_bytes_after": s.stats.kv_bytes,
        "work_bytes": event.work_bytes,
        "rss_rise_bytes": peak,
        "prefill_seconds": prefill,
        "compact_seconds": seconds,
        "cost": seconds / prefill,
        "phases": event.phases,
        "kl": _kl(ref["cont"].logits, scored.logits),
        "copy_dnll": s.score(ids[a:b]).nll - ref["copy"].nll,
        "fit_output_error": event.fit_output_error,
        "notes": event.notes,
    }


def offline(loaded, contexts: list[int], bounds: list[float], continuation: int) -> list[dict]:
    text, _ = find_document("argparse")
    all_ids = loaded.tokenizer(text)["input_ids"]
    rows = []
    for n in contexts:
        ids, cont = all_ids[:n], all_ids[n : n + continuation]
        full = AgentSession(model=loaded, max_kv_mb=None)
        full.append_tokens(ids)
        a, b = copy_span(n)
        ref = {"cont": full.score(cont, return_logits=True), "copy": full.score(ids[a:b])}
        del full
        for bound in [None, *bounds]:
            rows.append(offline_row(loaded, ids, cont, bound, ref))
            r = rows[-1]
            print(
                f"[bench memory] {n} tokens, bound {bound}: work {r['work_bytes'] / MiB:.1f} MiB, "
                f"rss +{(r['rss_rise_bytes'] or 0) / MiB:.1f} MiB, {r['cost']:.2f}x prefill, KL {r['kl']:.4f}",
                file=sys.stderr,
            )
    return rows


def online(loaded, tokens: int, max_kv_mb: float, policy: str) -> list[dict]:
    rows = []
    probe = AgentSession(model=loaded, max_kv_mb=max_kv_mb, policy=policy, budget_covers="all")
    share = probe.stats.max_kv_bytes / MiB  # the cache's share under "all"
    del probe
    for mb, covers in ((max_kv_mb, "kv"), (max_kv_mb, "all"), (share, "kv")):
        row = run_policy(loaded, policy, tokens, mb, 256, tokens, verbose=False, budget_covers=covers)
        row["setting"] = f"max_kv_mb={mb:.2f}, budget_covers={covers}"
        rows.append(row)
        print(f"[bench memory] online {row['setting']}: KL {row['kl']:.4f}", file=sys.stderr)
    return rows


def _mb(x) -> str:
    return "-" if x is None else f"{x / MiB:.1f}"


def to_markdown(data: dict, command: str) -> str:
    out = [
        "# Memory beside the cache",
        "",
        f"Model `{data['model']}`, {data['environment']['device']} ({data['environment']['cpu']}, "
        f"{data['environment']['torch_threads']} threads). Command: `{command}`",
        "",
        "## Offline: `compact(0.5)`, default policy (repeat-prefill queries, global head budgets)",
        "",
        "Bound: `max_work_mb` as a multiple of the context's KV bytes. Work: the compaction's own estimate;",
        "RSS rise: the process's peak resident memory over its level right before the compaction (VmHWM).",
        "Cost: compaction seconds / prefill seconds of the same session. KL: next-token distributions of",
        "the following tokens vs the uncompacted context; copy dNLL: reproducing an earlier passage.",
        "",
        "| context | KV MiB | bound | max work MiB | work MiB | RSS rise MiB | cost (x prefill) | KL | copy dNLL |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in data["offline"]:
        bound = "none" if r["bound"] is None else f"{r['bound']:g}x KV"
        out.append(
            f"| {r['context']} | {_mb(r['kv_bytes_before'])} | {bound} | {_mb(r['max_work_bytes'])} | "
            f"{_mb(r['work_bytes'])} | {_mb(r['rss_rise_bytes'])} | {r['cost']:.2f} | {r['kl']:.4f} | "
            f"{r['copy_dnll']:+.3f} |"
        )
    notes = sorted({n for r in data["offline"] for n in r["notes"] if "capped" in n or "groups" in n})
    if notes:
        out += ["", "What the bounds did: " + "; ".join(notes) + "."]
    on = data.get("online") or []
    if on:
        out += [
            "",
            f"## Online: {data['online_tokens']} greedy tokens under a budget, policy `{data['policy']}`",
            "",
            "Against an unbounded run teacher-forced on the same tokens. MiB columns: what bounds the cache, its",
            "peak, the query buffer, the bound on work and the most a compaction held, the undo copies (host).",
            "",
            "| setting | cache max | cache peak | query buffer | max work | peak work | undo | total peak "
            "| KL | agreement | tokens/s |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in on:
            total = r["peak_kv_bytes"] + r["query_buffer_bytes"] + r["peak_work_bytes"]
            out.append(
                f"| {r['setting']} | {_mb(r['max_kv_bytes'])} | {_mb(r['peak_kv_bytes'])} | "
                f"{_mb(r['query_buffer_bytes'])} | {_mb(r['max_work_bytes'])} | {_mb(r['peak_work_bytes'])} | "
                f"{_mb(r['peak_undo_bytes'])} | {_mb(total)} | {r['kl']:.4f} | {r['agreement']:.3f} | "
                f"{r['tokens_per_second']:.1f} |"
            )
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="agentmem bench memory", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--contexts", type=int, nargs="*", default=[2048, 4096])
    p.add_argument("--bounds", type=float, nargs="*", default=[0.5, 0.25], help="max_work_mb as x the context's KV")
    p.add_argument("--continuation", type=int, default=128)
    p.add_argument("--online-tokens", type=int, default=1000, help="0: no online part")
    p.add_argument("--max-kv-mb", type=float, default=32.0)
    p.add_argument("--policy", default="am-halve")
    p.add_argument("--out", type=Path, default=Path("docs/benchmarks"))
    p.add_argument("--name", default="memory")
    argv = sys.argv[1:] if argv is None else argv
    args = p.parse_args(argv)
    torch.manual_seed(0)
    loaded = load_model(args.model)
    data = {
        "model": loaded.name,
        "environment": environment(str(loaded.device)),
        "offline": offline(loaded, args.contexts, args.bounds, args.continuation),
        "online_tokens": args.online_tokens,
        "policy": args.policy,
        "max_kv_mb": args.max_kv_mb,
    }
    if args.online_tokens:
        data["online"] = online(loaded, args.online_tokens, args.max_kv_mb, args.policy)
    command = ("agentmem bench memory " + " ".join(argv)).strip()
    text = to_markdown(data, command)
    write_report(args.out, args.name, data, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
