"""Effect of position maintenance on a long run: teacher-forced NLL over 20,000 tokens of real text.

The default model was trained on 8,192 positions. Under a 16 MiB budget (~340 tokens of fp32 KV)
with the streaming policy, the attention sinks drift ever further from the queries. This reads
the same real text under each position mode and reports the NLL per segment:

* ``raw``: positions = token index (distances to the sinks reach 20,000),
* ``rebase``: exact re-basing only (cannot help while the sinks stay: distances are unchanged),
* ``clamp`` with several ``max_distance`` values (plain ``clamp`` is the default, a quarter of the
  trained context): the far past squeezed into a band.

    agentmem bench positions [--tokens 20000] [--max-kv-mb 16] [--out docs/benchmarks]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from ..agent import AgentSession
from ..kv.positions import PositionConfig
from ..models import load_model
from .common import environment, write_report


def long_text(min_tokens: int, tokenizer) -> tuple[list[int], list[str]]:
    """Real text: CPython standard-library sources, concatenated until long enough."""
    import importlib

    ids: list[int] = []
    used = []
    for name in ("typing", "inspect", "pydoc", "dataclasses", "functools"):
        path = Path(importlib.import_module(name).__file__)
        ids += tokenizer(path.read_text(encoding="utf-8"), add_special_tokens=not ids)["input_ids"]
        used.append(str(path))
        if len(ids) >= min_tokens:
            break
    return ids[:min_tokens], used


def teacher_forced_nll(session: AgentSession, ids: list[int], chunk: int) -> list[float]:
    """NLL of every token after the first, reading ids through the session in chunks (memory updates)."""
    nll: list[float] = []
    cache = session.cache
    for start in range(0, len(ids) - 1, chunk):
        part = ids[start : start + chunk]
        targets = ids[start + 1 : start + 1 + len(part)]
        logits = session.engine.run(cache, part, "all", session.compactions)[: len(targets)]
        nll += torch.nn.functional.cross_entropy(
            logits, torch.tensor(targets, device=logits.device), reduction="none"
        ).tolist()
    return nll


def run(tokens: int, max_kv_mb: float, model: str, segment: int, modes: list[str]) -> dict:
    loaded = load_model(model)
    ids, sources = long_text(tokens, loaded.tokenizer)
    results = []
    for mode in modes:
        name, _, dist = mode.partition(":")
        cfg = PositionConfig(mode=name, max_distance=int(dist) if dist else None)
        s = AgentSession(model=loaded, max_kv_mb=max_kv_mb, positions=cfg)
        t0 = time.perf_counter()
        nll = teacher_forced_nll(s, ids, s.chunk_tokens)
        seconds = time.perf_counter() - t0
        segs = [sum(nll[i : i + segment]) / len(nll[i : i + segment]) for i in range(0, len(nll), segment)]
        max_dist = max(s.cache.next_position - layer.min_pos for layer in s.cache.layers if layer.min_pos is not None)
        results.append(
            {
                "mode": mode,
                "mean_nll": sum(nll) / len(nll),
                "segments": segs,
                "seconds": seconds,
                "compactions": len(s.compactions),
                "final_next_position": s.cache.next_position,
                "position_offset": s.cache.position_offset,
                "final_max_distance": max_dist,
                "peak_kv_bytes": s.stats.peak_kv_bytes,
                "max_kv_bytes": s.max_kv_bytes,
            }
        )
        print(
            f"[bench positions] {mode:>12}: mean NLL {results[-1]['mean_nll']:.4f} ({seconds:.0f} s)", file=sys.stderr
        )
    return {
        "model": loaded.name,
        "tokens": len(ids),
        "max_kv_mb": max_kv_mb,
        "segment": segment,
        "sources": sources,
        "environment": environment(str(loaded.device)),
        "results": results,
    }


def to_markdown(data: dict, command: str) -> str:
    seg = data["segment"]
    n_seg = len(data["results"][0]["segments"])
    head = " | ".join(f"{i * seg / 1000:g}-{min((i + 1) * seg, data['tokens']) / 1000:g}k" for i in range(n_seg))
    lines = [
        f"# Positions on a {data['tokens']:,}-token run",
        "",
        f"Model `{data['model']}` (trained on 8,192 positions), streaming policy (4 sinks + recent window), "
        f"`max_kv_mb={data['max_kv_mb']}`, teacher-forced over real text: "
        + ", ".join(f"`{s}`" for s in data["sources"])
        + ". NLL in nats/token (lower is better), per segment.",
        "",
        f"| mode | mean NLL | {head} | final next position | final max distance | compactions |",
        "|---|---:|" + "---:|" * n_seg + "---:|---:|---:|",
    ]
    for r in data["results"]:
        segs = " | ".join(f"{x:.3f}" for x in r["segments"])
        lines.append(
            f"| `{r['mode']}` | **{r['mean_nll']:.4f}** | {segs} | {r['final_next_position']} | "
            f"{r['final_max_distance']} | {r['compactions']} |"
        )
    lines += ["", f"Command: `{command}`", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="agentmem bench positions", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--tokens", type=int, default=20000)
    p.add_argument("--max-kv-mb", type=float, default=16.0)
    p.add_argument("--segment", type=int, default=2500)
    p.add_argument("--modes", nargs="+", default=["raw", "rebase", "clamp:8192", "clamp:4096", "clamp", "clamp:1024"])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--out", type=Path, default=Path("docs/benchmarks"))
    argv = sys.argv[1:] if argv is None else argv
    args = p.parse_args(argv)
    data = run(args.tokens, args.max_kv_mb, args.model, args.segment, args.modes)
    command = ("agentmem bench positions " + " ".join(argv)).strip()
    write_report(args.out, "positions", data, to_markdown(data, command))
    print(to_markdown(data, command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
