"""Calibrate per-head budget profiles from sensitivity curves (``agentmem calibrate``).

For each calibration text, the first ``context`` tokens are read into an unbounded session and
compacted offline (Attention Matching, repeat-prefill queries, uniform budgets) once per keep
ratio. Then, for every (global-attention layer, KV head) and every swept ratio r, the cache holds
every head at the ``baseline`` ratio except that one, which holds its ratio-r compaction; the
curve records the change, against all heads at baseline, of KL(full || compacted) over the
next-token distributions of the text's next ``continuation`` tokens. (KL rather than the change of
log-perplexity: one head moves the NLL by ~1e-3 nats, below its noise, while the KL to the full
cache is a strictly positive, much smoother signal of the same damage.) Curves are averaged over
texts and made non-increasing in r (more entries are never predicted to hurt).

Shares: for each target ratio, start every head at the smallest swept ratio, hand out the rest of
the budget in small steps to the head whose predicted loss falls most, then swap steps between
heads while that lowers the predicted total; a head's share is capped at ``max_share``. The
profile's shares are the mean over target ratios, capped and renormalised.

    agentmem calibrate [--model smollm2-135m] [--texts difflib /usr/share/common-licenses/GPL-3] [--out F]
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import torch

from .agent import AgentSession
from .files import atomic_write
from .models import LoadedModel, load_model
from .policy.config import AMConfig
from .policy.profiles import HeadProfile, profiles_dir

DEFAULT_TEXTS = ("difflib", "/usr/share/common-licenses/GPL-3")
DEFAULT_RATIOS = (0.02, 0.05, 0.25, 0.5, 1.0)
DEFAULT_TARGETS = (0.05, 0.1, 0.25)


def read_text(name: str) -> tuple[str, str]:
    """A calibration text: a file path, or the name of an importable module (its source)."""
    path = Path(name)
    if path.is_file():
        return path.read_text(encoding="utf-8", errors="replace"), str(path)
    try:
        mod = __import__(name, fromlist=["_"])
    except ImportError:
        raise FileNotFoundError(f"calibration text {name!r} is neither a file nor an importable module") from None
    src = Path(getattr(mod, "__file__", "") or "")
    if src.suffix != ".py" or not src.is_file():
        raise FileNotFoundError(f"module {name!r} has no Python source to read")
    return src.read_text(encoding="utf-8"), str(src)


class Progress:
    """A one-line progress bar with an estimate of the time left, on stderr."""

    def __init__(self, total: int, label: str, enabled: bool = True):
        self.total, self.label, self.enabled = total, label, enabled
        self.done, self.t0 = 0, time.perf_counter()

    def step(self, n: int = 1) -> None:
        self.done += n
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.t0
        left = elapsed / self.done * (self.total - self.done) if self.done else 0.0
        bar = "#" * int(30 * self.done / self.total)
        sys.stderr.write(
            f"\r{self.label} [{bar:<30}] {self.done}/{self.total}  {elapsed:5.0f}s elapsed, ~{left:4.0f}s left"
        )
        if self.done >= self.total:
            sys.stderr.write("\n")
        sys.stderr.flush()


def _layer_blocks(session: AgentSession, layer: int) -> list:
    cache_layer = session.cache.layers[layer]
    return [cache_layer.read_span(h, 0, cache_layer.lengths[h]) for h in range(cache_layer.num_heads)]


def sensitivity_curves(
    loaded: LoadedModel,
    ids: Sequence[int],
    context: int,
    continuation: int,
    baseline: float,
    ratios: Sequence[float],
    layers: Sequence[int],
    progress: Progress | None = None,
) -> torch.Tensor:
    """(len(layers), H_kv, len(ratios)) change of the continuation's KL to the full cache vs all heads
    at ``baseline``."""
    policy = AMConfig(head_budgets="uniform")
    ctx, cont = list(ids[:context]), list(ids[context : context + continuation])
    full = AgentSession(model=loaded, max_kv_mb=None, policy=policy)
    full.append_tokens(ctx)
    compacted: dict[float, AgentSession] = {}
    for r in sorted({*ratios, baseline}):
        if r < 1.0:
            s = full.fork()
            s.compact(r)
            compacted[r] = s
    base = compacted[baseline]
    ref = torch.log_softmax(full.score(cont, return_logits=True).logits, dim=-1)

    def kl(session: AgentSession) -> float:
        lq = torch.log_softmax(session.score(cont, return_logits=True).logits, dim=-1)
        return float((ref.exp() * (ref - lq)).sum(-1).mean())

    base_kl = kl(base)
    heads = loaded.spec.num_kv_heads
    out = torch.zeros(len(layers), heads, len(ratios), dtype=torch.float64)
    for i, layer in enumerate(layers):
        full_layer = full.cache.layers[layer]
        lengths = list(full_layer.lengths)
        blocks = {r: _layer_blocks(s, layer) for r, s in compacted.items()}
        blocks[1.0] = _layer_blocks(full, layer)
        saved = base.cache.layers[layer].snapshot()
        for h in range(heads):
            for j, r in enumerate(ratios):
                # the layer from its full state, every head at baseline except h at ratio r
                base.cache.layers[layer].restore(full_layer.snapshot())
                per_head = [[(0, lengths[g], blocks[r if g == h else baseline][g])] for g in range(heads)]
                base.cache.replace_spans(layer, per_head)
                out[i, h, j] = kl(base) - base_kl
                if progress is not None:
                    progress.step()
        base.cache.layers[layer].restore(saved)
    return out


def _interp(curve: torch.Tensor, grid: torch.Tensor, r: float) -> float:
    """Piecewise-linear curve value at r (clamped to the grid)."""
    r = min(max(r, float(grid[0])), float(grid[-1]))
    j = int(torch.searchsorted(grid, torch.tensor(r, dtype=grid.dtype)).clamp(1, len(grid) - 1))
    x0, x1, y0, y1 = float(grid[j - 1]), float(grid[j]), float(curve[j - 1]), float(curve[j])
    return y0 + (y1 - y0) * (r - x0) / (x1 - x0) if x1 > x0 else y0


def solve_allocation(curves: torch.Tensor, grid: torch.Tensor, target: float, max_share: float) -> torch.Tensor:
    """Per-head keep ratios (N,) with mean ``target`` minimising the summed predicted loss.

    curves (N, G) predicted loss at the ratios ``grid`` (G,). Greedy fill in steps of target/20
    from the smallest ratio, then pairwise swaps while they lower the total.
    """
    n = curves.shape[0]
    lo, hi = float(grid[0]), 1.0
    step = target / 20
    cap = max_share * target * n  # a head's ratio may not exceed this share of the total
    a = [min(lo, target)] * n
    budget = target * n - sum(a)

    def loss(h: int, r: float) -> float:
        return _interp(curves[h], grid, r)

    def room(h: int) -> bool:
        return a[h] + step <= min(hi, cap) + 1e-12

    while budget > 1e-9:
        d = min(step, budget)
        gains = [loss(h, a[h]) - loss(h, a[h] + d) if room(h) else -float("inf") for h in range(n)]
        best = max(range(n), key=gains.__getitem__)
        if gains[best] == -float("inf"):
            break
        a[best] += d
        budget -= d
    for _ in range(50 * n):  # swaps: move one step from the head that loses least to the one that gains most
        gains = [loss(h, a[h]) - loss(h, a[h] + step) if room(h) else -float("inf") for h in range(n)]
        costs = [loss(h, a[h] - step) - loss(h, a[h]) if a[h] - step >= lo - 1e-12 else float("inf") for h in range(n)]
        j = max(range(n), key=gains.__getitem__)
        i = min((h for h in range(n) if h != j), key=costs.__getitem__, default=None)
        if i is None or gains[j] - costs[i] <= 1e-9:
            break
        a[i] -= step
        a[j] += step
    return torch.tensor(a, dtype=torch.float64)


def shares_from_curves(
    curves: torch.Tensor, ratios: Sequence[float], baseline: float, targets: Sequence[float], max_share: float
) -> torch.Tensor:
    """(L, H) shares summing to 1 from curves (L, H, R) measured against ``baseline``."""
    layers, heads, _ = curves.shape
    grid_list = sorted({*ratios, baseline})
    grid = torch.tensor(grid_list, dtype=torch.float64)
    full = torch.zeros(layers * heads, len(grid_list), dtype=torch.float64)
    flat = curves.reshape(layers * heads, -1).double()
    for j, r in enumerate(ratios):
        full[:, grid_list.index(r)] = flat[:, j]
    full = torch.cummin(full, dim=1).values  # non-increasing in the ratio (isotonic, from the left)
    per_target = []
    for target in targets:
        a = solve_allocation(full, grid, target, max_share)
        per_target.append(a / a.sum())
    shares = torch.stack(per_target).mean(dim=0)
    for _ in range(10):  # cap, renormalise
        shares = shares.clamp_max(max_share)
        shares = shares / shares.sum()
    return shares.reshape(layers, heads)


def calibrate(
    model: str = "smollm2-135m",
    texts: Sequence[str] = DEFAULT_TEXTS,
    context: int = 2048,
    continuation: int = 256,
    baseline: float = 0.1,
    ratios: Sequence[float] = DEFAULT_RATIOS,
    targets: Sequence[float] = DEFAULT_TARGETS,
    max_share_factor: float = 4.0,
    loaded: LoadedModel | None = None,
    show_progress: bool = True,
) -> HeadProfile:
    """Measure the curves on ``texts`` and solve the shares; see the module docstring."""
    if baseline in ratios:
        raise ValueError(f"the baseline ratio {baseline} must not be one of the swept ratios {list(ratios)}")
    loaded = loaded or load_model(model)
    spec = loaded.spec
    layers = [i for i in range(spec.num_layers) if spec.sliding_window[i] is None]
    t0 = time.perf_counter()
    sources, curves = [], []
    progress = Progress(len(texts) * len(layers) * spec.num_kv_heads * len(ratios), "calibrating", show_progress)
    for name in texts:
        text, source = read_text(name)
        ids = loaded.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) < context + continuation:
            raise ValueError(f"{source} has {len(ids)} tokens; calibration needs {context + continuation}")
        curves.append(sensitivity_curves(loaded, ids, context, continuation, baseline, ratios, layers, progress))
        sources.append(source)
    mean = torch.stack(curves).mean(dim=0)
    max_share = min(1.0, max_share_factor / (len(layers) * spec.num_kv_heads))
    shares = shares_from_curves(mean, ratios, baseline, targets, max_share)
    return HeadProfile(
        model=spec.name,
        config_hash=spec.config_hash,
        num_layers=spec.num_layers,
        num_kv_heads=spec.num_kv_heads,
        layers=layers,
        baseline=baseline,
        ratios=list(ratios),
        curves=mean.tolist(),
        shares=shares.tolist(),
        target_ratios=list(targets),
        max_share=max_share,
        calibration={
            "texts": sources,
            "context": context,
            "continuation": continuation,
            "queries": "repeat-prefill",
            "method": "am (uniform budgets)",
            "seconds": round(time.perf_counter() - t0, 1),
            "date": datetime.now(UTC).strftime("%Y-%m-%d"),
            "torch": torch.__version__,
        },
    )


def write_profile(profile: HeadProfile, path: Path | None = None) -> Path:
    """Write atomically (temp file + rename) to ``path`` (default: policies/profiles/<model>.json)."""
    text = profile.model_dump_json(indent=1) + "\n"
    return atomic_write(path or profiles_dir() / f"{profile.model}.json", lambda tmp: Path(tmp).write_text(text))


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="agentmem calibrate", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--texts", nargs="+", default=list(DEFAULT_TEXTS), help="files or module names (not bench texts)")
    p.add_argument("--context", type=int, default=2048)
    p.add_argument("--continuation", type=int, default=256)
    p.add_argument("--baseline", type=float, default=0.1)
    p.add_argument("--ratios", type=float, nargs="+", default=list(DEFAULT_RATIOS))
    p.add_argument("--targets", type=float, nargs="+", default=list(DEFAULT_TARGETS))
    p.add_argument("--max-share-factor", type=float, default=4.0, help="cap on a head's share, x the uniform share")
    p.add_argument("--out", type=Path, default=None, help="default: policies/profiles/<model>.json")
    args = p.parse_args(argv)
    profile = calibrate(
        args.model,
        args.texts,
        args.context,
        args.continuation,
        args.baseline,
        args.ratios,
        args.targets,
        args.max_share_factor,
    )
    path = write_profile(profile, args.out)
    print(f"wrote {path} ({profile.calibration['seconds']} s)")
    return 0
