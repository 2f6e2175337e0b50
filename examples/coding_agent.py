"""A coding-agent loop whose tools read files and run commands; every tool output is compacted
right after it is read, and its receipt printed.

The agent's plan is scripted (the 135M default model cannot plan tool calls reliably); the model
reads every tool output into its bounded memory and answers the user's question at the end, from
memory. With a model that emits tool calls, the same loop takes them from its replies instead.

python examples/coding_agent.py --max-kv-mb 24
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import sysconfig
import time

from agentmem import AgentSession

STDLIB = sysconfig.get_paths()["stdlib"]
QUESTION = "What does textwrap.shorten do, and what placeholder does it use by default?"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--max-kv-mb", type=float, default=24.0)
    p.add_argument("--policy", default=None)
    p.add_argument("--tool-ratio", type=float, default=None, help="default: the policy's tool_ratio (0.25)")
    args = p.parse_args()

    session = AgentSession(max_kv_mb=args.max_kv_mb, policy=args.policy)

    # ------------------------------------------------------------------ tools
    @session.tool(ratio=args.tool_ratio)
    def list_dir(path: str) -> str:
        return "\n".join(sorted(n for n in os.listdir(path) if n.endswith(".py")))

    @session.tool(ratio=args.tool_ratio)
    def read_file(path: str) -> str:
        with open(path, encoding="utf-8") as f:
            return f.read()

    @session.tool(ratio=args.tool_ratio)
    def run(command: str) -> str:
        done = subprocess.run(shlex.split(command), capture_output=True, text=True, timeout=60)
        return f"$ {command}\n{done.stdout}{done.stderr}(exit {done.returncode})"

    # ------------------------------------------------------------------ the loop
    session.append(
        "You are a coding assistant. You read files and command outputs, then answer briefly and exactly.",
        role="system",
        pin=True,
    )
    session.append(QUESTION, role="user", pin=True)  # the user's request stays exact; the agent gets to work
    plan = [
        (list_dir, STDLIB),
        (read_file, os.path.join(STDLIB, "textwrap.py")),
        (run, f"{sys.executable} -c \"import textwrap; print(textwrap.shorten('The quick brown fox jumps', 15))\""),
        (run, "ls -la " + STDLIB + "/json"),
    ]
    t0 = time.perf_counter()
    for tool, arg in plan:
        receipt = tool(arg)
        print(receipt.summary())
    answer = session.chat("Answer my question from what the tools showed.", max_new_tokens=120)
    st = session.stats
    print(f"\nuser: {QUESTION}\nassistant: {answer.text.strip()}\n")
    print(
        f"memory: {st.kv_bytes / 2**20:.2f} MiB now, peak {st.peak_kv_bytes / 2**20:.2f} of {args.max_kv_mb:g} MiB; "
        f"{st.logical_tokens:,} tokens read, {st.physical_tokens:.0f} entries stored, "
        f"{len(st.compactions)} compactions, {time.perf_counter() - t0:.0f} s"
    )


if __name__ == "__main__":
    main()
