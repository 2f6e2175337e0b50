"""Quality of compaction vs the full cache on real text, every method at equal physical size.

The setting of ``../shared/PEERS.md``: the first ``--context`` tokens of a CPython standard-library
file are read into an unbounded session, then compacted offline (``session.compact(ratio)``) so
that every KV head of every layer keeps ``round(ratio * context)`` entries (4 sinks included).
Measured against the uncompacted session, in the same run:

* ``kl``: KL(full || compacted) of the next-token distributions over the true continuation,
* ``cont``: dNLL (nats/token) of the next ``--continuation`` tokens of the file,
* ``copy``: dNLL of reproducing context tokens [300, 812) right after the context (recall),
* ``cost``: compaction seconds / seconds to prefill the same context (query generation included).

    agentmem bench quality [--ratios 0.5 0.25 0.1 0.05] [--methods ...] [--files argparse]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from ..models import load_model
from ..session import AgentSession
from .common import environment, stdlib_text, write_report

# name -> (policy settings of the base session, compact() keyword arguments, description)
METHODS: dict[str, tuple[dict | str, dict, str]] = {
    "window": ("streaming", {"method": "window"}, "4 sinks + most recent tokens (StreamingLLM)"),
    "am": (
        "am-halve-uniform",
        {"method": "am"},
        "AM, highest-attention keys, repeat-prefill queries, uniform head budgets (the default offline "
        "allocation is global: `am-global` in quality_budgets.md)",
    ),
    "am-omp": (
        {"name": "am-halve", "offline_head_budgets": "uniform", "selection": "omp", "omp_step": 8},
        {"method": "am"},
        "AM, OMP keys (8 per refit), repeat-prefill queries",
    ),
    "am-onpolicy": (
        {"name": "am-halve", "offline_head_budgets": "uniform", "on_policy_groups": 3},
        {"method": "am"},
        "`am`, on-policy: queries recomputed for 3 layer groups in turn",
    ),
    "am-recent": (
        "am-halve-uniform",
        {"method": "am", "queries": "recent"},
        "AM, queries of the last 128 tokens (free)",
    ),
    "am-context": (
        {"name": "am-halve", "offline_head_budgets": "uniform", "queries": "context", "query_buffer": 512},
        {"method": "am", "queries": "context"},
        "AM, a uniform sample of 512 of the context's own queries (free)",
    ),
    "evict-rp": (
        {"name": "am-halve", "offline_head_budgets": "uniform", "fit_beta": False, "fit_values": False},
        {"method": "am"},
        "highest-attention keys, uniform budgets, beta = 0 and copied values (KVzip-style uniform eviction)",
    ),
}
# ablations of `am` (not run by default): what the defaults buy
ABLATIONS: dict[str, tuple[dict | str, dict, str]] = {
    "am-q2048": (
        {"name": "am-halve", "offline_head_budgets": "uniform", "query_cap": 2048},
        {"method": "am"},
        "`am` ranking keys with 2048 queries",
    ),
    "am-beta-only": (
        {"name": "am-halve", "offline_head_budgets": "uniform", "fit_values": False},
        {"method": "am"},
        "`am` with copied values",
    ),
    "am-weak-ridge": (
        {"name": "am-halve", "offline_head_budgets": "uniform", "ridge": 1e-3},
        {"method": "am"},
        "`am` with a weak pull of the values toward the copied ones",
    ),
    "am-random-fit": (
        {"name": "am-halve", "offline_head_budgets": "uniform", "span_selection": False},
        {"method": "am"},
        "`am` selecting chunk by chunk (uniform per chunk), fits on random queries",
    ),
}
# per-head budgets at equal total entries (not run by default; `am` uses the shipped profile when one matches)
BUDGETS: dict[str, tuple[dict | str, dict, str]] = {
    "am-uniform": ("am-halve-uniform", {"method": "am"}, "`am`, every KV head keeps the same number of entries"),
    "am-profile": (
        {"name": "am-halve", "head_budgets": "profile", "offline_head_budgets": "profile"},
        {"method": "am"},
        "`am`, per-head shares from the calibrated profile",
    ),
    "am-global": (
        {"name": "am-halve", "head_budgets": "global", "offline_head_budgets": "global"},
        {"method": "am"},
        "`am`, per-context global top-k of repeat-prefill attention over all heads (KVzip-style allocation)",
    ),
    "am-mixed": (
        {"name": "am-halve", "head_budgets": "profile+global", "offline_head_budgets": "profile+global"},
        {"method": "am"},
        "`am`, mean of the profile and the global allocation",
    ),
    "evict-global": (
        {"name": "am-halve", "offline_head_budgets": "global", "fit_beta": False, "fit_values": False},
        {"method": "am"},
        "global allocation, selected keys, beta = 0, copied values (our KVzip-like eviction)",
    ),
}
METHODS.update(ABLATIONS)
METHODS.update(BUDGETS)
DEFAULT_METHODS = [m for m in METHODS if m not in ABLATIONS and m not in BUDGETS]
COPY_SPAN = (300, 812)


def _kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    lp, lq = torch.log_softmax(p_logits, -1), torch.log_softmax(q_logits, -1)
    return float((lp.exp() * (lp - lq)).sum(-1).mean())


def run(model: str, files: list[str], context: int, continuation: int, ratios: list[float], methods: list[str]) -> dict:
    torch.manual_seed(0)
    loaded = load_model(model)
    tok = loaded.tokenizer
    rows = []
    for name in files:
        text, path = stdlib_text(name)
        ids = tok(text)["input_ids"]
        ctx, cont = ids[:context], ids[context : context + continuation]
        copy = ctx[COPY_SPAN[0] : COPY_SPAN[1]]
        bases: dict[str, AgentSession] = {}
        prefills = []
        for method in methods:
            policy = METHODS[method][0]
            key = json.dumps(policy, sort_keys=True)
            if key not in bases:
                base = AgentSession(model=loaded, max_kv_mb=None, policy=policy)
                t0 = time.perf_counter()
                base.append_tokens(ctx)
                prefills.append(time.perf_counter() - t0)
                bases[key] = base
        while len(prefills) < 3:  # the cost unit: median time to prefill the context
            t0 = time.perf_counter()
            AgentSession(model=loaded, max_kv_mb=None, policy="streaming").append_tokens(ctx)
            prefills.append(time.perf_counter() - t0)
        prefill_seconds = sorted(prefills)[len(prefills) // 2]
        full = next(iter(bases.values()))
        ref_cont = full.score(cont, return_logits=True)
        ref_copy = full.score(copy)
        rows.append(
            {
                "file": path,
                "method": "full",
                "ratio": 1.0,
                "cont_nll": ref_cont.nll,
                "copy_nll": ref_copy.nll,
                "kl": 0.0,
                "cost": 0.0,
            }
        )
        for method in methods:
            policy, kwargs, _ = METHODS[method]
            base = bases[json.dumps(policy, sort_keys=True)]
            for ratio in ratios:
                s = base.fork()
                t0 = time.perf_counter()
                event = s.compact(ratio, **kwargs)
                seconds = time.perf_counter() - t0
                c = s.score(cont, return_logits=True)
                r = s.score(copy)
                row = {
                    "file": path,
                    "method": method,
                    "ratio": ratio,
                    "entries_per_head": s.stats.physical_tokens,
                    "kl": _kl(ref_cont.logits, c.logits),
                    "cont_nll": c.nll,
                    "cont_dnll": c.nll - ref_cont.nll,
                    "copy_nll": r.nll,
                    "copy_dnll": r.nll - ref_copy.nll,
                    "compact_seconds": seconds,
                    "cost": seconds / prefill_seconds,
                    "fit_output_error": event.fit_output_error,
                    "notes": event.notes,
                }
                rows.append(row)
                print(
                    f"[bench quality] {Path(path).name} {method:>10} {ratio:<5}: kl {row['kl']:.3f} "
                    f"cont {row['cont_dnll']:+.3f} copy {row['copy_dnll']:+.2f} cost {row['cost']:.2f}x",
                    file=sys.stderr,
                )
    return {
        "model": loaded.name,
        "context": context,
        "continuation": continuation,
        "ratios": ratios,
        "methods": {m: METHODS[m][2] for m in methods},
        "prefill_seconds": prefill_seconds,
        "environment": environment(str(loaded.device)),
        "rows": rows,
    }


def to_markdown(data: dict, command: str) -> str:
    ratios = data["ratios"]
    files = sorted({r["file"] for r in data["rows"]})
    lines = [
        "# Quality: compaction vs the full cache",
        "",
        f"Model `{data['model']}`, first {data['context']} tokens of each file as context, every method keeping "
        f"`round(ratio x {data['context']})` entries per KV head and layer on average (the same total for every "
        "method). `kl`: KL(full || compacted) of the "
        f"next-token distributions over the next {data['continuation']} tokens; `cont`: their dNLL; `copy`: dNLL of "
        f"reproducing context tokens {COPY_SPAN[0]}..{COPY_SPAN[1]} right after the context (recall); `cost`: "
        "compaction time / prefill time of the context, same run. Lower is better everywhere.",
        "",
        "Methods: " + "; ".join(f"`{m}`: {d}" for m, d in data["methods"].items()) + ".",
        "",
    ]
    for f in files:
        rows = [r for r in data["rows"] if r["file"] == f]
        full = next(r for r in rows if r["method"] == "full")
        lines += [
            f"## `{f}`",
            "",
            f"Full cache: continuation NLL {full['cont_nll']:.3f}, copy NLL {full['copy_nll']:.3f}.",
            "",
            "| method | " + " | ".join(f"ratio {r} kl / cont / copy (cost)" for r in ratios) + " |",
            "|---|" + "---:|" * len(ratios),
        ]
        for m in data["methods"]:
            cells = []
            for ratio in ratios:
                r = next((x for x in rows if x["method"] == m and x["ratio"] == ratio), None)
                cells.append(
                    "-"
                    if r is None
                    else f"{r['kl']:.3f} / {r['cont_dnll']:+.3f} / {r['copy_dnll']:+.2f} ({r['cost']:.2f}x)"
                )
            lines.append(f"| `{m}` | " + " | ".join(cells) + " |")
        lines.append("")
    lines += [f"Command: `{command}`", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="agentmem bench quality", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--files", nargs="+", default=["argparse"], help="standard-library modules to read")
    p.add_argument("--context", type=int, default=2048)
    p.add_argument("--continuation", type=int, default=512)
    p.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.25, 0.1, 0.05])
    p.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, choices=list(METHODS))
    p.add_argument("--out", type=Path, default=Path("docs/benchmarks"))
    p.add_argument("--name", default="quality", help="report file stem")
    argv = sys.argv[1:] if argv is None else argv
    args = p.parse_args(argv)
    data = run(args.model, args.files, args.context, args.continuation, args.ratios, args.methods)
    command = ("agentmem bench quality " + " ".join(argv)).strip()
    write_report(args.out, args.name, data, to_markdown(data, command))
    print(to_markdown(data, command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
