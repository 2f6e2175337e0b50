"""Put our measured quality numbers next to the peers measured on the same model and setting.

The peer numbers are quoted from the project's PEERS.md (kvpress presses and the reference
Attention Matching code, run on SmolLM2-135M-Instruct, the first 2,048 tokens of CPython 3.11's
argparse.py, dNLL of the next 512 tokens / of reproducing tokens 300..812 right after the
context). They were not re-run here; ours come from docs/benchmarks/quality.json and quality_budgets.json.

    python tools/compare_peers.py [--quality Q.json ...] [--out docs/benchmarks/peers.md]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

RATIOS = [0.5, 0.25, 0.1, 0.05]
# method -> {ratio: (cont dNLL, copy dNLL)}, quoted from PEERS.md
PEERS: dict[str, dict[float, tuple[float, float] | None]] = {
    "window: 4 sinks + recent": {0.5: (0.002, 2.21), 0.25: (0.088, 2.26), 0.1: (0.181, 2.27), 0.05: (0.267, 2.27)},
    "kvpress Knorm": {0.5: (0.179, 0.84), 0.25: (0.289, 1.84), 0.1: (0.342, 2.10), 0.05: (0.382, 2.15)},
    "kvpress TOVA": {0.5: (0.050, 1.47), 0.25: (0.109, 1.99), 0.1: (0.218, 2.17), 0.05: (0.280, 2.22)},
    "kvpress SnapKV": {0.5: (0.016, 1.75), 0.25: (0.071, 2.10), 0.1: (0.152, 2.21), 0.05: (0.230, 2.23)},
    "kvpress ObservedAttention (H2O-like)": {
        0.5: (0.024, 1.21),
        0.25: (0.084, 1.92),
        0.1: (0.161, 2.15),
        0.05: (0.202, 2.21),
    },
    "kvpress ExpectedAttention": {0.5: (0.008, 1.49), 0.25: (0.063, 1.99), 0.1: (0.151, 2.14), 0.05: (0.196, 2.17)},
    "kvpress AdaKV(SnapKV)": {0.5: (0.015, 1.71), 0.25: (0.059, 2.05), 0.1: (0.132, 2.17), 0.05: (0.219, 2.23)},
    "kvpress KVzip (global top-k, repeat-prefill scores)": {
        0.5: (0.002, -0.01),
        0.25: (0.020, -0.03),
        0.1: (0.094, -0.02),
        0.05: (0.158, 0.88),
    },
    "reference AM, highest-attention, repeat-prefill, uniform": {
        0.5: (0.028, 0.32),
        0.25: (0.066, 0.91),
        0.1: (0.176, 1.72),
        0.05: (0.239, 1.97),
    },
    "reference AM, same, context-prefill queries": {
        0.5: (0.044, 0.83),
        0.25: (0.429, 1.86),
        0.1: (0.761, 2.64),
        0.05: (0.620, 2.11),
    },
    "reference AM, OMP-fast, repeat-prefill": {0.5: None, 0.25: None, 0.1: (0.119, 1.57), 0.05: (0.202, 1.90)},
    "reference uniform KVzip-style eviction": {
        0.5: (0.017, 0.39),
        0.25: (0.057, 1.10),
        0.1: (0.132, 1.79),
        0.05: (0.196, 1.98),
    },
}


def _cell(v: tuple[float, float] | None) -> str:
    return "-" if v is None else f"{v[0]:+.3f} / {v[1]:+.2f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--quality",
        type=Path,
        nargs="+",
        default=[Path("docs/benchmarks/quality.json"), Path("docs/benchmarks/quality_budgets.json")],
    )
    p.add_argument("--out", type=Path, default=Path("docs/benchmarks/peers.md"))
    args = p.parse_args()
    ours: dict[str, dict[float, tuple[float, float]]] = {}
    for path in args.quality:
        for r in json.loads(path.read_text())["rows"]:
            if r["method"] != "full" and r["file"].endswith("argparse.py"):
                ours.setdefault(r["method"], {})[r["ratio"]] = (r["cont_dnll"], r["copy_dnll"])
    lines = [
        "# agentmem next to the peers of PEERS.md",
        "",
        "Same model (SmolLM2-135M-Instruct), same context (first 2,048 tokens of `argparse.py`), same measures: "
        "cont = dNLL of the next 512 tokens, copy = dNLL of reproducing tokens 300..812 right after the context, "
        "both vs the full cache; lower is better. Peer rows are quoted from PEERS.md (not re-run here); "
        f"agentmem rows come from {', '.join(f'`{q}`' for q in args.quality)} (`agentmem bench quality`). "
        "Cells: cont / copy.",
        "",
        "| method | " + " | ".join(f"keep {r}" for r in RATIOS) + " |",
        "|---|" + "---:|" * len(RATIOS),
    ]
    for name, row in ours.items():
        lines.append(f"| **agentmem `{name}`** | " + " | ".join(_cell(row.get(r)) for r in RATIOS) + " |")
    for name, row in PEERS.items():
        lines.append(f"| {name} (PEERS.md) | " + " | ".join(_cell(row.get(r)) for r in RATIOS) + " |")
    lines.append("")
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
