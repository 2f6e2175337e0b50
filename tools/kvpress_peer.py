"""NVIDIA kvpress on agentmem's default model, documents and protocol, for the same table as ours.

Replicates the language-modelling task of agentmem/bench/quality.py (``lm_task``): the first
``--context`` tokens of each document of agentmem.bench.common.DOCUMENTS are the context, the next
``--continuation`` the continuation, ``copy_span(context)`` the recalled passage. The last context
token is pending, as in our sessions: a press compresses the prefill of ``ctx[:-1]`` (the way
kvpress's pipeline prefills a context, ``with press(model): model.model(...)``), then
``[ctx[-1]] + cont[:-1]`` (and, on a fresh copy of the compressed cache, ``[ctx[-1]] + copy[:-1]``)
run on top at the original positions. ``ratio`` is the fraction KEPT (``compression_ratio = 1 -
ratio``). Needs kvpress' own virtualenv (it pins transformers < 5.3); never touches the network:

    /work/kvpress-venv/bin/python tools/kvpress_peer.py [--context 2048 --continuation 512 ...]
"""

from __future__ import annotations

import argparse
import ast
import copy
import glob
import importlib.metadata
import importlib.util
import json
import logging
import os
import sys
import time
from pathlib import Path
from types import ModuleType

import torch
import torch.nn.functional as F
from tqdm import tqdm

os.environ["HF_HUB_OFFLINE"] = os.environ["TRANSFORMERS_OFFLINE"] = "1"  # before transformers is imported
ROOT = Path(__file__).resolve().parents[1]
MODEL_GLOB = "~/.cache/agentmem/converted/SmolLM2-135M-Instruct.Q4_1-*/"
PRESSES = ["SnapKVPress", "ExpectedAttentionPress", "KVzipPress", "StreamingLLMPress"]
RATIOS = [0.5, 0.25, 0.1, 0.05, 0.02]
APPLIED = {
    "SnapKVPress": "scores the context by the attention of its last 64 queries (window kept, avg-pooled, kernel 5); "
    "no sink protection (token 0 can be evicted in some layers); keeps part of the window only when ratio x n < 64",
    "ExpectedAttentionPress": "expected attention of the next 512 positions from the context's query statistics "
    "x ||v||, 4 sinks kept",
    "KVzipPress": "max attention of a 'Repeat the previous context exactly.' reconstruction pass, global top-k over "
    "layers and heads (non-uniform per head; evicted keys masked, not removed), 4 sinks kept; prefix_length set to "
    "0 (our context has no chat-template prefix), chat-template suffix as kvpress computes it",
    "StreamingLLMPress": "4 sinks + the most recent tokens",
}


def _common() -> ModuleType:
    """agentmem/bench/common.py alone (stdlib + torch): importing the agentmem package would pull its
    whole stack (sessions, engine) into this transformers-5.2 process."""
    spec = importlib.util.spec_from_file_location("agentmem_bench_common", ROOT / "agentmem/bench/common.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _from_quality(*names: str) -> dict:
    """Top-level functions of agentmem/bench/quality.py compiled from its source (its relative imports
    of the agentmem stack cannot run here), so the copy span and the KL are ours verbatim."""
    path = ROOT / "agentmem/bench/quality.py"
    tree = ast.parse(path.read_text())
    body = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in names]
    ns: dict = {"torch": torch}
    exec(compile(ast.Module(body=body, type_ignores=[]), str(path), "exec"), ns)
    return {n: ns[n] for n in names}


def _reset_masks(model: torch.nn.Module) -> None:
    for layer in model.model.layers:  # KVzip's head-wise eviction lives on the attention modules
        layer.self_attn.masked_key_indices = None


def prefill(model: torch.nn.Module, ids: list[int], press: object | None = None) -> tuple[object, float, float]:
    """(cache of ids, seconds of the whole prefill, seconds spent compressing)."""
    from transformers import DynamicCache

    _reset_masks(model)
    cache, x, spent = DynamicCache(), torch.tensor([ids]), [0.0]
    if press is None:
        t0 = time.perf_counter()
        model.model(input_ids=x, past_key_values=cache)
        return cache, time.perf_counter() - t0, 0.0
    compress = press.compress

    def timed(*a: object, **k: object) -> object:
        t = time.perf_counter()
        out = compress(*a, **k)
        spent[0] += time.perf_counter() - t
        return out

    press.compress = timed  # scorer presses compress inside the prefill hooks
    t0 = time.perf_counter()
    with press(model):
        if type(press).__name__ == "KVzipPress":
            press.prefix_length = 0  # KVzip: raw text, nothing to skip before the context
        model.model(input_ids=x, past_key_values=cache)
        t1 = time.perf_counter()
    t2 = time.perf_counter()  # KVzip scores and evicts on leaving the context manager
    return cache, t2 - t0, spent[0] + t2 - t1


def kept_per_head(model: torch.nn.Module, cache: object) -> torch.Tensor:
    """(layers, kv heads) entries each head attends to: cache length minus KVzip-masked entries."""
    heads = model.config.num_key_value_heads
    out = torch.tensor([[float(layer.keys.shape[2])] * heads for layer in cache.layers])
    for i, layer in enumerate(model.model.layers):
        idx = getattr(layer.self_attn, "masked_key_indices", None)
        if idx is not None:
            out[i] -= torch.bincount(idx[1].cpu(), minlength=heads).float()
    return out


def score(
    model: torch.nn.Module, cache: object, start: int, pending: int, target: list[int]
) -> tuple[torch.Tensor, float]:
    """fp32 logits predicting each token of target after pending (run at positions start...), mean NLL."""
    ids = torch.tensor([[pending] + target[:-1]])
    pos = torch.arange(start, start + ids.shape[1]).unsqueeze(0)
    logits = model(input_ids=ids, past_key_values=cache, position_ids=pos).logits[0].float()
    return logits, float(F.cross_entropy(logits, torch.tensor(target)))


def evaluate(model: torch.nn.Module, cache: object, ctx: list[int], cont: list[int], span: list[int]) -> dict:
    c_logits, c_nll = score(model, copy.deepcopy(cache), len(ctx) - 1, ctx[-1], cont)
    _, r_nll = score(model, cache, len(ctx) - 1, ctx[-1], span)
    return {"logits": c_logits, "cont_nll": c_nll, "copy_nll": r_nll}


def compression_ratio(press: str, ratio: float, n: int, equal: bool) -> float:
    """kvpress keeps int(n * (1 - compression_ratio)); ``equal`` nudges it to keep round(ratio * n)."""
    if not equal:
        return 1 - ratio
    k = round(ratio * n)
    return (n - k) / n if press == "KVzipPress" else (n - k - 0.5) / n


@torch.no_grad()
def run(args: argparse.Namespace) -> dict:
    import kvpress
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    torch.manual_seed(0)
    logging.getLogger("kvpress").setLevel(logging.ERROR)
    hf_logging.disable_progress_bar()  # weight loading; our own bar stays
    common, quality = _common(), _from_quality("copy_span", "_kl")
    tok = AutoTokenizer.from_pretrained(args.model_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        args.model_dir, dtype=torch.float32, attn_implementation="sdpa", local_files_only=True
    ).eval()
    versions = {p: importlib.metadata.version(p) for p in ("kvpress", "transformers", "torch")}
    a, b = quality["copy_span"](args.context)
    data: dict = {"model": str(Path(args.model_dir).resolve()), "versions": versions, "context": args.context}
    data.update(continuation=args.continuation, ratios=args.ratios, presses=args.presses, copy_span=[a, b])
    data.update(equal_entries=args.equal_entries, torch_threads=torch.get_num_threads(), documents=[])
    data.update(rows=[], failures=[], applied={p: APPLIED.get(p, "kvpress defaults") for p in args.presses})
    n = args.context - 1
    steps = len(args.docs) * len(args.presses) * len(args.ratios)
    with tqdm(total=steps, desc="kvpress peer", unit="step", file=sys.stderr) as bar:
        for name in args.docs:
            text, path = common.find_document(name)
            ids = tok(text)["input_ids"]
            if len(ids) < args.context + args.continuation:
                raise ValueError(f"{path} has {len(ids)} tokens, fewer than --context + --continuation")
            ctx, cont = ids[: args.context], ids[args.context : args.context + args.continuation]
            span = ctx[a:b]
            bar.set_postfix_str(f"{name} full")
            cache, prefill_s, _ = prefill(model, ctx[:-1])
            ref = evaluate(model, cache, ctx, cont, span)
            kind = common.DOCUMENTS.get(name, ("file", []))[0]
            data["documents"].append({"name": name, "kind": kind, "path": path, "tokens": len(ids)})
            data["documents"][-1].update(prefill_seconds=prefill_s, cont_nll=ref["cont_nll"], copy_nll=ref["copy_nll"])
            for press_name in args.presses:
                for ratio in args.ratios:
                    bar.set_postfix_str(f"{name} {press_name} {ratio}")
                    cr = compression_ratio(press_name, ratio, n, args.equal_entries)
                    try:
                        press = getattr(kvpress, press_name)(compression_ratio=cr)
                        cache, total_s, seconds = prefill(model, ctx[:-1], press)
                        kept = kept_per_head(model, cache)
                        out = evaluate(model, cache, ctx, cont, span)
                    except Exception as e:  # a press that cannot run here is recorded, not fatal
                        reason = f"{type(e).__name__}: {e}".strip()
                        data["failures"].append({"press": press_name, "doc": name, "ratio": ratio, "reason": reason})
                        bar.update()
                        continue
                    finally:
                        _reset_masks(model)
                    data["rows"].append(
                        {
                            "doc": name,
                            "press": press_name,
                            "ratio": ratio,
                            "compression_ratio": cr,
                            "kept_fraction": float(kept.mean()) / n,
                            "entries_per_head": float(kept.mean()),
                            "entries_min": float(kept.min()),
                            "entries_max": float(kept.max()),
                            "equal_bytes_entries": round(ratio * n),
                            "kl": quality["_kl"](ref["logits"], out["logits"]),
                            "cont_dnll": out["cont_nll"] - ref["cont_nll"],
                            "copy_dnll": out["copy_nll"] - ref["copy_nll"],
                            "seconds": seconds,
                            "prefill_seconds": total_s - seconds,
                            "cost": seconds / (total_s - seconds),  # same call: robust to a shared machine
                        }
                    )
                    bar.update()
    return data


def _mean(rows: list[dict], key: str) -> float | None:
    return sum(r[key] for r in rows) / len(rows) if rows else None


def _table(data: dict, cell, docs: list[str]) -> list[str]:
    ratios = data["ratios"]
    lines = ["| press | " + " | ".join(f"{r:g}" for r in ratios) + " |", "|---|" + "---:|" * len(ratios)]
    for p in data["presses"]:
        sel = [[x for x in data["rows"] if x["press"] == p and x["ratio"] == r and x["doc"] in docs] for r in ratios]
        lines.append(f"| `{p}` | " + " | ".join(cell(rows) if rows else "-" for rows in sel) + " |")
    return lines + [""]


def to_markdown(data: dict) -> str:
    docs = data["documents"]
    names = [d["name"] for d in docs]
    a, b = data["copy_span"]
    v = data["versions"]
    lines = [
        "# kvpress on our protocol",
        "",
        f"NVIDIA kvpress {v['kvpress']} (transformers {v['transformers']}, torch {v['torch']}, CPU fp32, sdpa, "
        f"{data['torch_threads']} threads) on `{data['model']}`, written by `tools/kvpress_peer.py`. Same documents "
        f"and protocol as `agentmem bench quality` (quality.md): the first {data['context']} tokens are the context "
        f"(the last one pending, so {data['context'] - 1} are compressed), the next {data['continuation']} the "
        f"continuation; `kl` = KL(full || compressed) over the continuation, `cont` / `copy` = dNLL of the "
        f"continuation / of reproducing context tokens {a}..{b} right after the context. Ratio = fraction kept "
        "(`compression_ratio = 1 - ratio`"
        + (", nudged so each head keeps `round(ratio x n)`" if data["equal_entries"] else "")
        + "); the full cache is of the same run.",
        "",
    ]
    lines += [
        f"- `{d['name']}` ({d['kind']}, {d['tokens']:,} tokens): `{d['path']}`; full cache: continuation "
        f"NLL {d['cont_nll']:.3f}, copy NLL {d['copy_nll']:.3f}"
        for d in docs
    ]
    lines += ["", "Presses, as applied (kvpress defaults otherwise):", ""]
    lines += [f"- `{p}`: {d}" for p, d in data["applied"].items()]
    lines += ["", f"## kl / cont / copy (mean of {len(docs)} documents)", ""]
    lines += _table(
        data, lambda r: f"{_mean(r, 'kl'):.3f} / {_mean(r, 'cont_dnll'):+.3f} / {_mean(r, 'copy_dnll'):+.2f}", names
    )
    lines += ["## Entries kept per head, mean (min..max) vs our equal-bytes rule round(ratio x n)", ""]
    lines += _table(
        data,
        lambda r: (
            f"{_mean(r, 'entries_per_head'):.1f} ({min(x['entries_min'] for x in r):g}.."
            f"{max(x['entries_max'] for x in r):g}) vs {r[0]['equal_bytes_entries']}"
        ),
        names,
    )
    lines += ["## Cost: compression seconds / seconds of the prefill they ran in (timing, varies run to run)", ""]
    lines += _table(data, lambda r: f"{_mean(r, 'cost'):.2f}", names)
    for d in docs:
        lines += [f"### `{d['name']}`: kl / cont / copy", ""]
        lines += _table(
            data, lambda r: f"{r[0]['kl']:.3f} / {r[0]['cont_dnll']:+.3f} / {r[0]['copy_dnll']:+.2f}", [d["name"]]
        )
    if data["failures"]:
        lines += ["## Failures", ""]
        lines += [f"- `{f['press']}` ({f['doc']}, ratio {f['ratio']:g}): {f['reason']}" for f in data["failures"]]
        lines += [""]
    lines += [f"Command: `{data['command']}`", ""]
    return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    found = sorted(glob.glob(os.path.expanduser(MODEL_GLOB)))
    p.add_argument("--model-dir", default=found[0] if found else None, help=f"HF directory (default: {MODEL_GLOB})")
    p.add_argument("--docs", nargs="+", default=None, help="names from DOCUMENTS or file paths (default: all)")
    p.add_argument("--context", type=int, default=2048)
    p.add_argument("--continuation", type=int, default=512)
    p.add_argument("--ratios", type=float, nargs="+", default=RATIOS, help="fractions kept")
    p.add_argument("--presses", nargs="+", default=PRESSES, help="kvpress class names")
    p.add_argument("--equal-entries", action="store_true", help="keep exactly round(ratio x n) per head")
    p.add_argument("--out", type=Path, default=ROOT / "docs/benchmarks")
    args = p.parse_args(argv)
    if args.model_dir is None:
        p.error(f"no model directory matches {MODEL_GLOB}; pass --model-dir")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    args.docs = args.docs or list(_common().DOCUMENTS)
    data = run(args)
    data["command"] = " ".join(["/work/kvpress-venv/bin/python", "tools/kvpress_peer.py", *argv])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "kvpress.json").write_text(json.dumps(data, indent=2) + "\n")
    (args.out / "kvpress.md").write_text(to_markdown(data))
    print(to_markdown(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
