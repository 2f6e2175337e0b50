"""Quality of compaction vs the full cache on real text, every method at equal physical size.

Three tasks, every method of ``--methods`` at every ratio of ``--ratios``, against the full cache
of the same run (methods: bench/methods.py; each keeps ``round(ratio x context)`` entries per KV
head and layer on average, so the same number of bytes):

* **language modelling** on documents found on this machine (bench/common.py ``DOCUMENTS``): the
  first ``--context`` tokens are read into an unbounded session and compacted offline
  (``session.compact(ratio)``); ``kl`` = KL(full || compacted) of the next-token distributions and
  ``cont`` = dNLL over the next ``--continuation`` tokens; ``copy`` = dNLL of reproducing an
  earlier passage of the context right after it (recall); ``cost`` = compaction seconds / prefill
  seconds of the context.
* **retrieval** (bench/retrieval.py): exact match of looking up values by key in a long
  tool-style output, asked after compaction, on ``--retrieval-model``.
* **online** (bench/online.py): a greedy generation of ``--online-tokens`` under
  ``--online-mb`` MiB with repeated compactions; agreement and KL against an unbounded run that is
  teacher-forced on the same tokens.

Writes ``<name>.json``, ``<name>.md`` and ``<name>.png`` into ``--out``. Seeded: the same command
gives the same numbers (the ``cost`` timings aside). ``--quick`` is a small smoke run (< 5 min).

    agentmem bench quality [--quick] [--methods ...] [--ratios 0.5 0.25 0.1 0.05 0.02]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from ..agent import AgentSession
from ..models import load_model
from . import retrieval
from .common import DOCUMENTS, environment, find_document, write_report
from .methods import HEADLINE, METHODS, ONLINE_POLICIES
from .online import run_policy
from .plots import quality_plot

RATIOS = [0.5, 0.25, 0.1, 0.05, 0.02]


def _kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    lp, lq = torch.log_softmax(p_logits, -1), torch.log_softmax(q_logits, -1)
    return float((lp.exp() * (lp - lq)).sum(-1).mean())


def copy_span(context: int) -> tuple[int, int]:
    """The earlier passage the recall task reproduces: tokens [300, 812) of a 2,048-token context."""
    start = min(300, context // 8)
    return start, start + min(512, context // 4)


def _bases(loaded, methods: list[str], ids: list[int], bar: tqdm) -> tuple[dict[str, AgentSession], float]:
    """One unbounded session per distinct base policy, each having read ``ids``; median prefill s."""
    bases: dict[str, AgentSession] = {}
    prefills = []
    for method in methods:
        key = json.dumps(METHODS[method][0], sort_keys=True)
        if key not in bases:
            bar.set_postfix_str(f"prefill {method}")
            base = AgentSession(model=loaded, max_kv_mb=None, policy=METHODS[method][0])
            t0 = time.perf_counter()
            base.append_tokens(ids)
            prefills.append(time.perf_counter() - t0)
            bases[key] = base
    return bases, sorted(prefills)[len(prefills) // 2]


def _compacted(bases: dict[str, AgentSession], method: str, ratio: float):
    policy, kwargs, _ = METHODS[method]
    s = bases[json.dumps(policy, sort_keys=True)].fork()
    t0 = time.perf_counter()
    event = s.compact(ratio, **kwargs)
    return s, time.perf_counter() - t0, event


def lm_task(loaded, docs: list[str], context: int, continuation: int, ratios, methods, bar: tqdm) -> tuple:
    tok = loaded.tokenizer
    rows, found = [], []
    for name in docs:
        text, path = find_document(name)
        ids = tok(text)["input_ids"]
        if len(ids) < context + continuation:
            raise ValueError(f"{path} has {len(ids)} tokens, fewer than --context + --continuation")
        found.append({"name": name, "kind": DOCUMENTS.get(name, ("file", []))[0], "path": path, "tokens": len(ids)})
        ctx, cont = ids[:context], ids[context : context + continuation]
        a, b = copy_span(context)
        copy = ctx[a:b]
        bases, prefill = _bases(loaded, methods, ctx, bar)
        full = next(iter(bases.values()))
        ref_cont, ref_copy = full.score(cont, return_logits=True), full.score(copy)
        rows.append({"doc": name, "method": "full", "ratio": 1.0, "cont_nll": ref_cont.nll, "copy_nll": ref_copy.nll})
        for method in methods:
            for ratio in ratios:
                bar.set_postfix_str(f"{name} {method} {ratio}")
                s, seconds, event = _compacted(bases, method, ratio)
                c, r = s.score(cont, return_logits=True), s.score(copy)
                rows.append(
                    {
                        "doc": name,
                        "method": method,
                        "ratio": ratio,
                        "entries_per_head": s.stats.physical_tokens,
                        "kv_bytes": s.stats.kv_bytes,
                        "kl": _kl(ref_cont.logits, c.logits),
                        "cont_dnll": c.nll - ref_cont.nll,
                        "copy_dnll": r.nll - ref_copy.nll,
                        "compact_seconds": seconds,
                        "cost": seconds / prefill,
                        "fit_output_error": event.fit_output_error,
                        "notes": event.notes,
                    }
                )
                bar.update()
    return rows, found


def retrieval_task(loaded, tokens: int, n_probes: int, ratios, methods, bar: tqdm) -> dict:
    records = retrieval.records_for_tokens(loaded.tokenizer, tokens)
    text, pairs = retrieval.tool_output(records)
    asked = retrieval.probes(pairs, n_probes)
    ids = loaded.tokenizer(text)["input_ids"]
    bases, _ = _bases(loaded, methods, ids, bar)
    full = retrieval.exact_match(next(iter(bases.values())), asked)
    rows = []
    for method in methods:
        for ratio in ratios:
            bar.set_postfix_str(f"retrieval {method} {ratio}")
            s, _, _ = _compacted(bases, method, ratio)
            rows.append({"method": method, "ratio": ratio, "exact_match": retrieval.exact_match(s, asked)})
            bar.update()
    return {
        "model": loaded.name,
        "tokens": len(ids),
        "records": records,
        "probes": len(asked),
        "full": full,
        "rows": rows,
    }


def online_task(loaded, policies: list[str], tokens: int, max_kv_mb: float, bar: tqdm) -> list[dict]:
    out = []
    for policy in policies:
        bar.set_postfix_str(f"online {policy}")
        r = run_policy(loaded, policy, tokens, max_kv_mb, block=256, segment=max(tokens, 1), verbose=False)
        r.pop("sample", None)
        out.append(r)
        bar.update()
    return out


def _means(rows: list[dict]) -> dict:
    return {k: sum(r[k] for r in rows) / len(rows) for k in ("kl", "cont_dnll", "copy_dnll", "cost")}


def summarize(data: dict) -> dict[str, dict[float, dict]]:
    """summary[method][ratio]: the mean over documents of kl / cont_dnll / copy_dnll / cost, and retrieval."""
    out: dict[str, dict[float, dict]] = {}
    for m in data["methods"]:
        for ratio in data["ratios"]:
            rows = [r for r in data["lm"] if r["method"] == m and r["ratio"] == ratio]
            cell = _means(rows) if rows else {}
            ret = [r for r in (data.get("retrieval") or {}).get("rows", []) if r["method"] == m and r["ratio"] == ratio]
            cell["retrieval"] = ret[0]["exact_match"] if ret else None
            out.setdefault(m, {})[ratio] = cell
    return out


def peer_summary(peer: dict | None, data: dict) -> dict[str, dict[float, dict]]:
    """kvpress rows (tools/kvpress_peer.py) as summary rows ``kvpress <press>``, when measured in
    the same setting (model family, context, continuation, documents); else nothing."""
    if not peer or (peer["context"], peer["continuation"]) != (data["context"], data["continuation"]):
        return {}
    if {d["name"] for d in peer["documents"]} != {d["name"] for d in data["documents"]}:
        return {}
    out: dict[str, dict[float, dict]] = {}
    for press in peer["presses"]:
        for ratio in data["ratios"]:
            rows = [r for r in peer["rows"] if r["press"] == press and r["ratio"] == ratio]
            if rows:
                cell = _means(rows)
                out.setdefault(f"kvpress {press.removesuffix('Press')}", {})[ratio] = {**cell, "retrieval": None}
    return out


def run(args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    loaded = load_model(args.model)
    methods, ratios = args.methods, args.ratios
    steps = len(args.docs) * len(methods) * len(ratios)
    steps += len(methods) * len(ratios) if args.retrieval_tokens else 0
    steps += len(args.online_policies) if args.online_tokens else 0
    data: dict = {"model": loaded.name, "context": args.context, "continuation": args.continuation}
    data.update(ratios=ratios, methods={m: METHODS[m][2] for m in methods}, copy_span=copy_span(args.context))
    with tqdm(total=steps, desc="bench quality", unit="step", file=sys.stderr) as bar:
        data["lm"], data["documents"] = lm_task(
            loaded, args.docs, args.context, args.continuation, ratios, methods, bar
        )
        if args.retrieval_tokens:
            r_model = loaded if args.retrieval_model in (None, args.model) else load_model(args.retrieval_model)
            data["retrieval"] = retrieval_task(r_model, args.retrieval_tokens, args.probes, ratios, methods, bar)
        if args.online_tokens:
            data["online"] = {
                "tokens": args.online_tokens,
                "max_kv_mb": args.online_mb,
                "results": online_task(loaded, args.online_policies, args.online_tokens, args.online_mb, bar),
            }
    data["summary"] = {m: {str(r): v for r, v in by.items()} for m, by in summarize(data).items()}
    data["environment"] = environment(str(loaded.device))
    return data


def _fmt(x, spec: str) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def _table(summary: dict, ratios: list[float], key: str, spec: str, best=min) -> list[str]:
    lines = ["| method | " + " | ".join(f"{r:g}" for r in ratios) + " |", "|---|" + "---:|" * len(ratios)]
    winners = {}
    for r in ratios:
        vals = [summary[m][r].get(key) for m in summary if summary[m][r].get(key) is not None]
        winners[r] = best(vals) if vals else None
    for m in summary:
        cells = []
        for r in ratios:
            v = summary[m][r].get(key)
            cell = _fmt(v, spec)
            cells.append(f"**{cell}**" if v is not None and v == winners[r] else cell)
        lines.append(f"| `{m}` | " + " | ".join(cells) + " |")
    return lines + [""]


def to_markdown(data: dict, command: str, plot: str | None, peer: dict | None = None) -> str:
    ratios = data["ratios"]
    summary = {m: {float(r): v for r, v in by.items()} for m, by in data["summary"].items()}
    peers = peer_summary(peer, data)
    summary.update({m: {r: by.get(r, {}) for r in ratios} for m, by in peers.items()})
    docs = data["documents"]
    a, b = data["copy_span"]
    lines = [
        "# Quality: compaction vs the full cache",
        "",
        f"Model `{data['model']}`. Every method keeps `round(ratio x context)` entries per KV head and layer on "
        "average (the same bytes for every method); the ratio is the column. Measured against the full cache in "
        "the same run; the best value of each column is in bold. Reproduce with the command at the end.",
        "",
        f"Documents (first {data['context']} tokens as context, the next {data['continuation']} as continuation; "
        "found on this machine at run time):",
        "",
    ]
    lines += [f"- `{d['name']}` ({d['kind']}, {d['tokens']:,} tokens): `{d['path']}`" for d in docs]
    lines += [""]
    if plot:
        lines += [f"![quality vs ratio]({plot})", ""]
    lines += [f"## KL(full || compacted) over the continuation, nats/token (mean of {len(docs)} documents)", ""]
    lines += _table(summary, ratios, "kl", ".3f")
    lines += ["## Continuation dNLL, nats/token", ""] + _table(summary, ratios, "cont_dnll", "+.3f")
    lines += [f"## Recall: dNLL of reproducing context tokens {a}..{b} right after the context", ""]
    lines += _table(summary, ratios, "copy_dnll", "+.2f")
    ret = data.get("retrieval")
    if ret:
        lines += [
            "## Retrieval: key -> value exact match in a tool output",
            "",
            f"Model `{ret['model']}`: a `cat` of {ret['records']} (session id, user id) records, {ret['tokens']:,} "
            f"tokens; {ret['probes']} keys spread over it are looked up after compaction. Full cache: "
            f"**{ret['full']:.2f}**.",
            "",
        ]
        lines += _table(summary, ratios, "retrieval", ".2f", best=max)
    onl = data.get("online")
    if onl:
        lines += [
            f"## Online: {onl['tokens']:,} greedy tokens under `max_kv_mb={onl['max_kv_mb']:g}`",
            "",
            "Each policy generates greedily (end-of-sequence ignored); an unbounded session is teacher-forced on the "
            "same tokens. Agreement: how often its top-1 equals the budgeted run's token; KL(unbounded || budgeted).",
            "",
            "| policy | agreement | KL | compactions | peak KiB / budget KiB | all finite |",
            "|---|---:|---:|---:|---:|---|",
        ]
        for r in onl["results"]:
            lines.append(
                f"| `{r['policy']}` | {r['agreement']:.3f} | {r['kl']:.4f} | {r['compactions']} | "
                f"{r['peak_kv_bytes'] // 1024} / {r['max_kv_bytes'] // 1024} | {r['finite']} |"
            )
        lines.append("")
    lines += ["## Cost: compaction seconds / prefill seconds (timing, varies run to run)", ""]
    lines += _table(summary, ratios, "cost", ".2f")
    lines += ["## Per document: kl / cont / copy", ""]
    for d in docs:
        rows = [r for r in data["lm"] if r["doc"] == d["name"]]
        full = next(r for r in rows if r["method"] == "full")
        lines += [
            f"### `{d['name']}` (full cache: continuation NLL {full['cont_nll']:.3f}, copy NLL {full['copy_nll']:.3f})",
            "",
            "| method | " + " | ".join(f"{r:g}" for r in ratios) + " |",
            "|---|" + "---:|" * len(ratios),
        ]
        for m in data["methods"]:
            cells = []
            for ratio in ratios:
                r = next((x for x in rows if x["method"] == m and x["ratio"] == ratio), None)
                cells.append("-" if r is None else f"{r['kl']:.3f} / {r['cont_dnll']:+.3f} / {r['copy_dnll']:+.2f}")
            lines.append(f"| `{m}` | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["Methods: " + "; ".join(f"`{m}`: {d}" for m, d in data["methods"].items()) + ".", ""]
    if peers:
        lines += [
            f"`kvpress *` rows: NVIDIA kvpress {peer['versions']['kvpress']} (transformers "
            f"{peer['versions']['transformers']}, its own virtualenv) on the same model, documents and protocol, "
            f"made by `{peer['command']}` ([kvpress.md](kvpress.md)); "
            + "; ".join(f"`{k}`: {v}" for k, v in peer.get("applied", {}).items())
            + ".",
            "",
        ]
        for f in peer.get("failures", []):
            lines += [f"- kvpress {f['press']} failed on {f.get('doc')} at {f.get('ratio')}: {f['reason']}"]
    elif peer:
        lines += ["kvpress.json exists but was measured in another setting; not shown.", ""]
    env = data["environment"]
    lines += [
        f"Environment: torch {env['torch']}, transformers {env['transformers']}, {env['device']}, "
        f"{env['torch_threads']} threads.",
        "",
        f"Command: `{command}`",
        "",
    ]
    return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="agentmem bench quality", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--docs", nargs="+", default=list(DOCUMENTS), help="names from DOCUMENTS or file paths")
    p.add_argument("--context", type=int, default=2048)
    p.add_argument("--continuation", type=int, default=512)
    p.add_argument("--ratios", type=float, nargs="+", default=RATIOS)
    p.add_argument("--methods", nargs="+", default=list(HEADLINE), choices=list(METHODS))
    p.add_argument("--retrieval-model", default="gemma3-270m", help="model for the retrieval task")
    p.add_argument("--retrieval-tokens", type=int, default=2000, help="tool output length (0: skip the task)")
    p.add_argument("--probes", type=int, default=12)
    p.add_argument("--online-policies", nargs="+", default=ONLINE_POLICIES)
    p.add_argument("--online-tokens", type=int, default=1500, help="0: skip the online task")
    p.add_argument("--online-mb", type=float, default=8.0)
    p.add_argument("--quick", action="store_true", help="smoke run: 1 document, short context, 2 ratios, < 5 min")
    p.add_argument(
        "--render", action="store_true", help="re-write the markdown and plot from <out>/<name>.json (and kvpress.json)"
    )
    p.add_argument("--out", type=Path, default=Path("docs/benchmarks"))
    p.add_argument("--name", default=None, help="report file stem (default: quality, or quality_quick)")
    args = p.parse_args(argv)
    if args.quick:
        given = {a.split("=")[0] for a in argv if a.startswith("--")}
        quick = {"docs": ["argparse"], "context": 512, "continuation": 64, "ratios": [0.5, 0.1], "probes": 4}
        quick.update(retrieval_model=None, retrieval_tokens=300, online_tokens=120, online_mb=4.0)
        for k, v in quick.items():
            if "--" + k.replace("_", "-") not in given:
                setattr(args, k, v)
    args.name = args.name or ("quality_quick" if args.quick else "quality")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.render:
        data = json.loads((args.out / f"{args.name}.json").read_text())
        command = data["command"]
    else:
        data = run(args)
        command = data["command"] = ("agentmem bench quality " + " ".join(argv)).strip()
    peer_path = args.out / "kvpress.json"
    peer = json.loads(peer_path.read_text()) if peer_path.is_file() else None
    summary = {m: {float(r): v for r, v in by.items()} for m, by in data["summary"].items()}
    summary.update(peer_summary(peer, data))
    labels = {"retrieval": f"key -> value exact match ({data['retrieval']['model']})"} if data.get("retrieval") else {}
    title = f"{data['model']}: compaction vs the full cache, equal bytes per method"
    plot = quality_plot(summary, args.out / f"{args.name}.png", title, labels=labels)
    markdown = to_markdown(data, command, plot.name, peer)
    write_report(args.out, args.name, data, markdown)
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
