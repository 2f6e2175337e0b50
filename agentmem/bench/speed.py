"""Speed and memory of AgentSession vs ``model.generate`` with transformers' own cache.

Decode and prefill: both run the same model object, prompt and greedy decoding, at equal physical
length (the session is unbounded, so nothing is compacted), interleaved and repeated; the figures
are medians and the headline is the ratio agentmem / transformers measured in the same run. A
third column runs the session under a budget that holds about the prompt, so it compacts while
decoding. Compaction: seconds to compact the context to half with each method, as context
tokens/s and as a multiple of the prefill time of the same context. Memory: the KV bytes of
transformers' DynamicCache and of the session at the same length, and after compaction.

    agentmem bench speed [--lengths 256 1024 2048 4096] [--compaction-lengths 2048 4096 8192 16384]
                         [--new-tokens 64] [--repeats 3] [--out docs/benchmarks]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from ..agent import AgentSession
from ..decoding import collect
from ..models import load_model
from ..units import MiB
from .common import environment, find_document, median, timed, write_report

COMPACTION_METHODS = {
    "am": "am-halve",
    "am-fast": "am-fast",
    "am-uniform": "am-halve-uniform",
    "kvzip": "kvzip",
    "snapkv": "snapkv",
    "h2o": "h2o",
    "streaming": "streaming",
}


def _hf_generate(model, ids: torch.Tensor, n: int) -> None:
    model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)


def _session_generate(loaded, ids: list[int], n: int, max_kv_mb: float | None) -> tuple[float, float, int]:
    """(prefill seconds, decode seconds for n-1 steps, compactions)."""
    s = AgentSession(model=loaded, max_kv_mb=max_kv_mb)
    r = collect(s.stream_tokens(ids, n, ignore_eos=True))
    return r.stats.prefill_seconds, r.stats.decode_seconds, len(r.stats.compactions)


def _decode_after_compaction(loaded, ids: list[int], n: int, budgets: str) -> float:
    """Decode tokens/s after compacting the prompt to half its size with the given head budgets."""
    s = AgentSession(model=loaded, max_kv_mb=None, policy={"name": "am-halve", "offline_head_budgets": budgets})
    s.append_tokens(ids)
    s.compact(0.5, queries="recent")
    r = s.generate(" The", max_new_tokens=n, ignore_eos=True)
    return (n - 1) / r.stats.decode_seconds


def _hf_cache_bytes(model, ids: torch.Tensor) -> int:
    """Bytes of keys and values in transformers' DynamicCache after reading ids."""
    with torch.inference_mode():
        out = model(ids, use_cache=True)
        cache = out["cache"] if "cache" in out.keys() else out["past_key_values"]
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


def _compaction(loaded, ids: list[int], policy: str, dev: str) -> tuple[float, object, int]:
    """(seconds to compact the context to half with the policy's offline path, its event, kv bytes after)."""
    s = AgentSession(model=loaded, max_kv_mb=None, policy=policy)
    s.append_tokens(ids)
    event = None

    def compact():
        nonlocal event
        event = s.compact(0.5)

    seconds = timed(compact, dev)
    return seconds, event, s.stats.kv_bytes


def _prefill(loaded, ids: list[int], dev: str) -> float:
    """Seconds for an unbounded session to read ids."""
    s = AgentSession(model=loaded, max_kv_mb=None)
    return timed(lambda: s.append_tokens(ids), dev)


def decode_row(loaded, ids: list[int], new_tokens: int, repeats: int, dev: str) -> dict:
    """Decode and prefill against transformers at one context length, and KV memory."""
    length = len(ids)
    t_ids = torch.tensor([ids], device=loaded.device)
    budget_mb = AgentSession(model=loaded, max_kv_mb=None).cache.bytes_for_tokens(length) / MiB
    hf_pre, hf_dec, am_pre, am_dec, bud_dec, compactions = [], [], [], [], [], 0
    even, uneven = [], []
    _hf_generate(loaded.model, t_ids[:, :32], 2)  # warm-up
    for _ in range(repeats):
        t1 = timed(lambda x=t_ids: _hf_generate(loaded.model, x, 1), dev)
        tn = timed(lambda x=t_ids: _hf_generate(loaded.model, x, new_tokens), dev)
        hf_pre.append(t1)
        hf_dec.append((new_tokens - 1) / max(tn - t1, 1e-9))
        pre, dec, _ = _session_generate(loaded, ids, new_tokens, None)
        am_pre.append(pre)
        am_dec.append((new_tokens - 1) / dec)
        _, dec_b, compactions = _session_generate(loaded, ids, new_tokens, budget_mb)
        bud_dec.append((new_tokens - 1) / dec_b)
        even.append(_decode_after_compaction(loaded, ids, new_tokens, "uniform"))
        uneven.append(_decode_after_compaction(loaded, ids, new_tokens, "global"))
    row = {
        "context_tokens": length,
        "hf_prefill_tps": length / median(hf_pre),
        "agentmem_prefill_tps": length / median(am_pre),
        "hf_decode_tps": median(hf_dec),
        "agentmem_decode_tps": median(am_dec),
        "agentmem_budgeted_decode_tps": median(bud_dec),
        "budget_mb": budget_mb,
        "budgeted_compactions": compactions,
        "uniform_heads_decode_tps": median(even),
        "uneven_heads_decode_tps": median(uneven),
    }
    row["hf_kv_bytes"] = _hf_cache_bytes(loaded.model, t_ids)
    full = AgentSession(model=loaded, max_kv_mb=None)
    full.append_tokens(ids)
    row["agentmem_kv_bytes"], row["agentmem_payload_bytes"] = full.stats.kv_bytes, full.stats.payload_bytes
    row["uneven_ratio"] = row["uneven_heads_decode_tps"] / row["uniform_heads_decode_tps"]
    row["decode_ratio"] = row["agentmem_decode_tps"] / row["hf_decode_tps"]
    row["prefill_ratio"] = row["agentmem_prefill_tps"] / row["hf_prefill_tps"]
    return row


def compaction_row(loaded, ids: list[int], repeats: int, dev: str) -> dict:
    """Seconds of ``session.compact(0.5)`` per method at one context length, as multiples of the
    prefill of the same context measured in the same run (interleaved), with the phases of each."""
    prefills, runs = [], {name: [] for name in COMPACTION_METHODS}
    for _ in range(repeats):
        prefills.append(_prefill(loaded, ids, dev))
        for name, policy in COMPACTION_METHODS.items():
            runs[name].append(_compaction(loaded, ids, policy, dev))
    prefill = median(prefills)
    row = {"context_tokens": len(ids), "prefill_seconds": prefill, "methods": {}}
    for name, results in runs.items():
        seconds = median([r[0] for r in results])
        events = [r[1] for r in results]
        phases = {p: median([e.phases.get(p, 0.0) for e in events]) for p in events[0].phases}
        row["methods"][name] = {
            "seconds": seconds,
            "cost": seconds / prefill,
            "phases": {p: v / prefill for p, v in phases.items()},  # multiples of the prefill
            "work_bytes": max(e.work_bytes for e in events),
            "kv_bytes_before": events[0].kv_bytes_before,
            "kv_bytes_after": results[0][2],
        }
    return row


def run(
    lengths: list[int],
    compaction_lengths: list[int],
    new_tokens: int,
    repeats: int,
    model: str,
    device: str | None,
    compaction_repeats: int | None = None,
) -> dict:
    loaded = load_model(model, device=device)
    dev = str(loaded.device)
    text, source = find_document("argparse")
    all_ids = loaded.tokenizer(text)["input_ids"]
    rows, compaction = [], []
    for length in lengths:
        rows.append(decode_row(loaded, all_ids[:length], new_tokens, repeats, dev))
        r = rows[-1]
        print(
            f"[bench speed] {length:>5} tokens: decode {r['agentmem_decode_tps']:.1f} vs "
            f"{r['hf_decode_tps']:.1f} tok/s (x{r['decode_ratio']:.2f}), uneven heads x{r['uneven_ratio']:.2f}",
            file=sys.stderr,
        )
    for length in compaction_lengths:
        compaction.append(compaction_row(loaded, all_ids[:length], compaction_repeats or repeats, dev))
        am = compaction[-1]["methods"]["am"]
        print(f"[bench speed] {length:>5} tokens: am compaction {am['cost']:.2f}x prefill", file=sys.stderr)
    return {
        "model": loaded.name,
        "source_text": source,
        "new_tokens": new_tokens,
        "repeats": repeats,
        "compaction_repeats": compaction_repeats or repeats,
        "environment": environment(dev),
        "rows": rows,
        "compaction": compaction,
    }


def to_markdown(data: dict, command: str) -> str:
    env = data["environment"]
    lines = [
        "# Speed: AgentSession vs transformers `model.generate`",
        "",
        f"Model `{data['model']}`, device `{env['device']}` ({env['cpu']}, {env['torch_threads']} torch threads), "
        f"torch {env['torch']}, transformers {env['transformers']}. Prompt: the first N tokens of "
        f"`{data['source_text']}`; {data['new_tokens']} greedy tokens; medians of {data['repeats']} interleaved runs.",
        "",
        "Decode tokens/s at equal physical length (nothing compacted), and the ratio measured in the same run. "
        "*Budgeted*: the session with its default policy (`am-halve`) under a budget that holds about the prompt, "
        "so it compacts while it decodes; the compaction's time is included. *Even / uneven heads*: decode after "
        "compacting the prompt to half with uniform head budgets (one attention call per layer) or with global "
        "ones (heads of different sizes: one call per KV head), and their ratio.",
        "",
        "| context | HF decode tok/s | agentmem decode tok/s | ratio | agentmem budgeted tok/s (compactions) "
        "| HF prefill tok/s | agentmem prefill tok/s | ratio | even heads tok/s | uneven heads tok/s | ratio |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in data["rows"]:
        lines.append(
            f"| {r['context_tokens']} | {r['hf_decode_tps']:.1f} | {r['agentmem_decode_tps']:.1f} | "
            f"**{r['decode_ratio']:.2f}** | {r['agentmem_budgeted_decode_tps']:.1f} ({r['budgeted_compactions']}) | "
            f"{r['hf_prefill_tps']:.0f} | {r['agentmem_prefill_tps']:.0f} | {r['prefill_ratio']:.2f} | "
            f"{r['uniform_heads_decode_tps']:.1f} | {r['uneven_heads_decode_tps']:.1f} | {r['uneven_ratio']:.2f} |"
        )
    if data["rows"]:
        lines += [
            "",
            "## KV memory",
            "",
            "| context | transformers DynamicCache MiB | agentmem kv MiB (payload) |",
            "|---:|---:|---:|",
        ]
        for r in data["rows"]:
            lines.append(
                f"| {r['context_tokens']} | {r['hf_kv_bytes'] / MiB:.1f} | {r['agentmem_kv_bytes'] / MiB:.1f} "
                f"({r['agentmem_payload_bytes'] / MiB:.1f}) |"
            )
        lines += [
            "",
            "agentmem stores, per KV head and entry, beta (fp32), position and token index (int32) beside the key "
            "and value: 12 bytes more per head-entry than transformers' cache.",
        ]
    if data.get("compaction"):
        names = list(data["compaction"][0]["methods"])
        lines += [
            "",
            "## Compaction to half the context (offline, `session.compact(0.5)`)",
            "",
            f"Seconds (median of {data.get('compaction_repeats', data['repeats'])}) and, in brackets, the multiple of "
            "the prefill time of the same context measured in the same run; query generation (repeat-prefill for "
            "`am`, `am-uniform`, `kvzip`) included.",
            "",
            "| context | prefill | " + " | ".join(f"`{n}`" for n in names) + " |",
            "|---:|---:|" + "---:|" * len(names),
        ]
        for r in data["compaction"]:
            cells = [f"{r['methods'][n]['seconds']:.2f} s ({r['methods'][n]['cost']:.2f}x)" for n in names]
            lines.append(f"| {r['context_tokens']} | {r['prefill_seconds']:.2f} s | " + " | ".join(cells) + " |")
        phases = ("queries", "scores", "fits", "write")
        lines += [
            "",
            "Where `am`'s time goes, in multiples of the same prefill: *queries* (the repeat-prefill pass), *scores* "
            "(one pass per KV head giving the global head budgets and the key ranking), *fits* (beta and values), "
            "*write* (validation and cache writes); *work*: the most memory the compaction held beside the cache "
            "(reference queries + the largest batch of scores or fits), against the KV bytes it compacted.",
            "",
            "| context | " + " | ".join(phases) + " | total | work MiB | KV MiB before -> after |",
            "|---:|" + "---:|" * (len(phases) + 3),
        ]
        for r in data["compaction"]:
            am = r["methods"]["am"]
            cells = [f"{am['phases'].get(p, 0.0):.2f}x" for p in phases]
            kv = f"{am['kv_bytes_before'] / MiB:.1f} -> {am['kv_bytes_after'] / MiB:.1f}"
            lines.append(
                f"| {r['context_tokens']} | " + " | ".join(cells) + f" | {am['cost']:.2f}x | "
                f"{am['work_bytes'] / MiB:.0f} | {kv} |"
            )
    lines += ["", f"Command: `{command}`", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="agentmem bench speed", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 2048, 4096], help="decode and prefill")
    p.add_argument("--compaction-lengths", type=int, nargs="+", default=[2048, 4096, 8192, 16384])
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--compaction-repeats", type=int, default=None, help="default: --repeats")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--device", default=None)
    p.add_argument("--out", type=Path, default=Path("docs/benchmarks"))
    argv = sys.argv[1:] if argv is None else argv
    args = p.parse_args(argv)
    data = run(
        args.lengths,
        args.compaction_lengths,
        args.new_tokens,
        args.repeats,
        args.model,
        args.device,
        args.compaction_repeats,
    )
    command = "agentmem bench speed " + " ".join(argv)
    write_report(args.out, "speed", data, to_markdown(data, command.strip()))
    print(to_markdown(data, command.strip()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
