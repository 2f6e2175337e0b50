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
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from ..agent import AgentSession
from ..heap import release_freed_memory
from ..models import load_model
from ..units import MiB
from .common import environment, find_document, policy_of, write_report
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
    """Give freed heap back to the system (glibc) and reset VmHWM to the resident size (Linux), so
    that the next peak is what the next step adds; False where that is not possible."""
    release_freed_memory()
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def offline_row(loaded, ids: list[int], cont: list[int], bound: float | None) -> dict:
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
    kept = _status("VmRSS") - rss  # what the process still holds once compact() has returned
    a, b = copy_span(len(ids))
    scored, copy = s.score(cont, return_logits=True), s.score(ids[a:b])
    st = s.stats
    del s
    ref = _reference(loaded, ids, cont)  # after the measurement: its memory is not the compaction's
    return {
        "context": len(ids),
        "bound": bound,
        "max_work_bytes": st.max_work_bytes,
        "kv_bytes_before": kv_before,
        "kv_bytes_after": st.kv_bytes,
        "work_bytes": event.work_bytes,
        "undo_bytes": st.peak_undo_bytes,
        "rss_rise_bytes": peak,
        "rss_after_bytes": kept,
        "prefill_seconds": prefill,
        "compact_seconds": seconds,
        "cost": seconds / prefill,
        "phases": event.phases,
        "kl": _kl(ref["cont"].logits, scored.logits),
        "copy_dnll": copy.nll - ref["copy"].nll,
        "fit_output_error": event.fit_output_error,
        "notes": event.notes,
    }


def _reference(loaded, ids: list[int], cont: list[int]) -> dict:
    full = AgentSession(model=loaded, max_kv_mb=None)
    full.append_tokens(ids)
    a, b = copy_span(len(ids))
    return {"cont": full.score(cont, return_logits=True), "copy": full.score(ids[a:b])}


def _context(loaded, n: int, continuation: int) -> tuple[list[int], list[int]]:
    text, _ = find_document("argparse")
    all_ids = loaded.tokenizer(text)["input_ids"]
    return all_ids[:n], all_ids[n : n + continuation]


def _row(args, n: int, bound: float | None, env: dict | None = None) -> dict:
    cmd = [sys.executable, "-m", "agentmem.bench.memory", "--model", args.model, "--row", str(n)]
    cmd += ["--continuation", str(args.continuation)] + ([] if bound is None else ["--row-bound", str(bound)])
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if done.returncode:
        raise RuntimeError(f"bench memory row {n} / {bound} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def offline(args) -> list[dict]:
    """One fresh process per row, so that each one's resident-memory peak is its own; each row runs
    twice, the second time with glibc's mmap threshold fixed at 1 MiB (freed large blocks go back to
    the system at once, so the peak is live memory rather than the allocator's fragmentation)."""
    rows = []
    live_env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(MiB)}
    for n in args.contexts:
        for bound in [None, *args.bounds]:
            rows.append(_row(args, n, bound))
            rows[-1]["rss_live_rise_bytes"] = _row(args, n, bound, live_env)["rss_rise_bytes"]
            r = rows[-1]
            print(
                f"[bench memory] {n} tokens, bound {bound}: work {r['work_bytes'] / MiB:.1f} MiB, "
                f"undo {r['undo_bytes'] / MiB:.1f} MiB, rss +{(r['rss_rise_bytes'] or 0) / MiB:.1f} MiB, "
                f"{r['cost']:.2f}x prefill, KL {r['kl']:.4f}",
                file=sys.stderr,
            )
    return rows


def online(loaded, tokens: int, max_kv_mb: float, policy: str) -> list[dict]:
    """``max_kv_mb`` covering the cache only, then all of it (with the policy's query buffer in the
    model's dtype and in bf16), and each "all" run's cache share covering the cache only (the same
    cache with unbounded work and the model-dtype buffer: what the bound and the bf16 buffer cost)."""
    bf16 = policy_of(policy) if isinstance(policy_of(policy), dict) else {"name": policy}
    bf16 = {**bf16, "query_buffer_dtype": "bfloat16"}
    settings = []
    for pol, label in ((policy_of(policy), ""), (bf16, ", bf16 query buffer")):
        probe = AgentSession(model=loaded, max_kv_mb=max_kv_mb, policy=pol, budget_covers="all")
        share = probe.stats.max_kv_bytes / MiB  # the cache's share under "all"
        del probe
        if not label:
            settings.append((max_kv_mb, "kv", pol, label))
        settings += [(max_kv_mb, "all", pol, label), (share, "kv", policy_of(policy), "")]
    rows = []
    for mb, covers, pol, label in settings:
        row = run_policy(loaded, pol, tokens, mb, 256, tokens, verbose=False, budget_covers=covers)
        row["setting"] = f"max_kv_mb={mb:.2f}, budget_covers={covers}{label}"
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
        "undo: the layers as they were before `compact()` changed them, kept until it completes (on a CPU",
        "the old buffers themselves, the edits writing new ones; on CUDA copies in host memory);",
        "RSS rise: the process's peak resident memory over its level right before the compaction (VmHWM after",
        "`malloc_trim`, a fresh process per row) with glibc's default allocator, and *live*: the same run with",
        "`MALLOC_MMAP_THRESHOLD_=1048576` (large blocks returned at once: live memory, not fragmentation);",
        "RSS after: the resident memory right after `compact()` returned, over the same level (default allocator;",
        "`compact()` gives freed heap back, `agentmem.heap.release_freed_memory`).",
        "Cost: compaction seconds / prefill seconds of the same session. KL: next-token distributions of",
        "the following tokens vs the uncompacted context; copy dNLL: reproducing an earlier passage.",
        "",
        "| context | KV MiB | bound | max work MiB | work MiB | undo MiB | RSS rise MiB | live RSS rise MiB "
        "| RSS after MiB | cost (x prefill) | KL | copy dNLL |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in data["offline"]:
        bound = "none" if r["bound"] is None else f"{r['bound']:g}x KV"
        out.append(
            f"| {r['context']} | {_mb(r['kv_bytes_before'])} | {bound} | {_mb(r['max_work_bytes'])} | "
            f"{_mb(r['work_bytes'])} | {_mb(r.get('undo_bytes'))} | {_mb(r['rss_rise_bytes'])} | "
            f"{_mb(r.get('rss_live_rise_bytes'))} | {_mb(r.get('rss_after_bytes'))} | {r['cost']:.2f} | "
            f"{r['kl']:.4f} | "
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
            "peak, the query buffer, the bound on work and the most a compaction held, the undo state (the",
            "layers as they were).",
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
    p.add_argument("--row", type=int, help=argparse.SUPPRESS)  # one offline row, as JSON on stdout
    p.add_argument("--row-bound", type=float, help=argparse.SUPPRESS)
    argv = sys.argv[1:] if argv is None else argv
    args = p.parse_args(argv)
    torch.manual_seed(0)
    if args.row:
        loaded = load_model(args.model)
        ids, cont = _context(loaded, args.row, args.continuation)
        print(json.dumps(offline_row(loaded, ids, cont, args.row_bound)))
        return 0
    offline_rows = offline(args)
    loaded = load_model(args.model)
    data = {
        "model": loaded.name,
        "environment": environment(str(loaded.device)),
        "offline": offline_rows,
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
