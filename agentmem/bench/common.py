"""Shared helpers for benchmarks: real text found on this machine, environment, report writing."""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

# documents the quality benchmark reads: (label, kind, candidate paths, first one that exists wins);
# real text that exists independently of this project, found on the machine at run time. The head
# profiles were calibrated on difflib.py and GPL-3, so neither is used here.
DOCUMENTS: dict[str, tuple[str, list[str]]] = {
    "argparse": ("Python source", ["stdlib:argparse.py"]),
    "idle-news": ("changelog prose", ["stdlib:idlelib/NEWS.txt", "/usr/share/doc/nodejs/api/net.md"]),
    "mpl-2.0": ("legal prose", ["/usr/share/common-licenses/MPL-2.0", "stdlib:../LICENSE.txt"]),
}


def find_document(name: str) -> tuple[str, str]:
    """(text, path) of a document of :data:`DOCUMENTS` (or any file path) on this machine."""
    import sysconfig

    candidates = DOCUMENTS[name][1] if name in DOCUMENTS else [name]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for c in candidates:
        path = stdlib / c.removeprefix("stdlib:") if c.startswith("stdlib:") else Path(c)
        if path.is_file():
            return path.read_text(encoding="utf-8", errors="replace"), str(path.resolve())
    raise FileNotFoundError(f"document {name!r}: none of {candidates} exists on this machine")


def environment(device: str) -> dict:
    import transformers

    env = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": device,
        "torch_threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
    return env


def timed(fn: Callable[[], object], device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def write_report(out_dir: Path, stem: str, data: dict, markdown: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{stem}.json").write_text(json.dumps(data, indent=2) + "\n")
    (out_dir / f"{stem}.md").write_text(markdown)


def publish(args, data: dict, plot: Callable[[dict, Path], Path], markdown: Callable[[dict, str], str]) -> None:
    """Write a benchmark's plot, JSON and markdown as ``args.out / args.name`` and print the markdown."""
    args.out.mkdir(parents=True, exist_ok=True)
    text = markdown(data, plot(data, args.out / f"{args.name}.png").name)
    write_report(args.out, args.name, data, text)
    print(text)


def run_and_publish(what: str, argv: list[str] | None, parse_args, run, plot, markdown) -> int:
    """A benchmark's ``main``: parse ``argv`` (default: the command line), run with torch seeded,
    record the command that made it and publish the report (:func:`publish`)."""
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    torch.manual_seed(0)
    data = run(args)
    data["command"] = (f"agentmem bench {what} " + " ".join(argv)).strip()
    publish(args, data, plot, markdown)
    return 0


def policy_of(method: str) -> str | dict:
    """A policy name, or ``name:key=value,key=value`` for a variant (values parsed as JSON when they can
    be): ``am-halve:query_buffer=128``."""
    if ":" not in method:
        return method
    name, _, settings = method.partition(":")
    out: dict = {"name": name}
    for item in filter(None, settings.split(",")):
        key, _, value = item.partition("=")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out
