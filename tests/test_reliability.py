"""Regression tests for memory corruption and half-done operations (one test per failure found by
randomized use; each failed before its fix). The property-based fuzzer is tests/test_fuzz.py."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

from agentmem import AgentSession, BudgetError, SessionFileError
from agentmem.files import temp_files
from agentmem.models import wrap_model
from agentmem.persist import read_file, write_file
from tests.helpers import build_tiny, check_invariants, fingerprint

W = "the quick brown fox jumps over the lazy dog "

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def llama(tokenizer):
    return wrap_model(build_tiny("llama", len(tokenizer)), tokenizer, name="tiny-llama")


@pytest.fixture(scope="module")
def gemma(tokenizer):
    return wrap_model(build_tiny("gemma3", len(tokenizer)), tokenizer, name="tiny-gemma3")


def _logits(s: AgentSession) -> torch.Tensor:
    """Next-token logits without changing the session (run on a fork)."""
    return s.fork().next_logits()


# 1. score() compacted the live cache inside its scratch pass and the rollback left garbage
def test_score_that_compacts_leaves_memory_exactly_as_it_was(llama):
    s = AgentSession(llama, max_kv_mb=0.18)
    s.append(W * 4)
    before, logits = fingerprint(s), _logits(s)
    r = s.score(W * 16)
    assert r.tokens > 100 and math.isfinite(r.nll)
    assert fingerprint(s) == before and torch.equal(_logits(s), logits)
    assert not s.compactions
    check_invariants(s)
    assert s.generate(" the", max_new_tokens=8).stats.generated_tokens == 8


# 2. on Gemma 3, score() trimmed sliding-window layers inside the scratch pass
def test_score_on_sliding_window_layers_changes_nothing(gemma):
    s, twin = AgentSession(gemma, max_kv_mb=None), AgentSession(gemma, max_kv_mb=None)
    for x in (s, twin):
        x.append(W * 4)
    for _ in range(8):
        for x in (s, twin):
            x.append(" one two three four five six")
        s.score(" the lazy dog")
        check_invariants(s)
    assert fingerprint(s) == fingerprint(twin)
    torch.testing.assert_close(_logits(s), _logits(twin), rtol=0, atol=1e-5)


# 3. score() of text longer than the free budget failed under span policies (no query buffer in the clone)
@pytest.mark.parametrize("policy", ["am-halve", "h2o", "snapkv", "kvzip"])
def test_score_longer_than_the_free_budget_under_span_policies(llama, policy):
    s = AgentSession(llama, max_kv_mb=0.18, policy=policy)
    s.append(W * 3)
    before = fingerprint(s)
    r = s.score(W * 30)
    assert r.tokens > 250 and math.isfinite(r.nll)
    assert fingerprint(s) == before


# 4. a read that failed part way left the transcript and the pins ahead of the cache
def test_failed_pinned_read_changes_nothing(llama):
    s = AgentSession(llama, max_kv_mb=0.06)
    s.append(W)
    before = fingerprint(s)
    with pytest.raises(BudgetError):
        s.append(W * 20, pin=True)
    assert fingerprint(s) == before and s.pinned == []
    for _ in range(10):
        s.append(W)
        check_invariants(s)
    assert len(s.transcript_ids) == s.cache.logical_length + len(s.engine.pending)


def test_read_failing_inside_the_model_changes_nothing(llama, monkeypatch):
    s = AgentSession(llama, max_kv_mb=0.1)
    s.append(W * 3)
    before, logits = fingerprint(s), _logits(s)
    calls = {"n": 0}
    real = s.engine.forward_chunk

    def flaky(cache, chunk, keep):
        calls["n"] += 1
        if calls["n"] == 3:  # fail after two chunks (and a compaction or two) went through
            raise RuntimeError("device lost")
        return real(cache, chunk, keep)

    monkeypatch.setattr(s.engine, "forward_chunk", flaky)
    s.engine.chunk_tokens = 16
    with pytest.raises(RuntimeError, match="device lost"):
        s.append(W * 12)
    monkeypatch.undo()
    assert fingerprint(s) == before and torch.equal(_logits(s), logits)


# 5. switching policies mid-session: no query buffer (every budget compaction failed) or an unloadable file
@pytest.mark.parametrize(("old", "new"), [("streaming", "am-halve"), ("am-fast", "am-halve"), ("h2o", "snapkv")])
def test_policy_switch_keeps_compacting_and_saving(llama, tmp_path, old, new):
    s = AgentSession(llama, max_kv_mb=0.1, policy=old)
    s.append(W * 6)
    s.policy = new
    check_invariants(s)
    n = len(s.compactions)
    s.append(W * 30)  # needs budget compactions under the new policy
    assert len(s.compactions) > n and all(e.policy == new for e in s.compactions[n:])
    s.save(tmp_path / "s.agentmem")
    t = AgentSession.load(tmp_path / "s.agentmem", model=llama)
    torch.testing.assert_close(_logits(t), _logits(s), rtol=0, atol=0)


# 6. temperature=nan passed validation; the prompt was read, then sampling failed
@pytest.mark.parametrize("bad", [{"temperature": float("nan")}, {"top_p": float("inf")}, {"stop": [""]}])
def test_bad_sampling_arguments_are_refused_before_reading(llama, bad):
    s = AgentSession(llama, max_kv_mb=0.1)
    s.append(W)
    before = fingerprint(s)
    with pytest.raises(ValueError):
        s.generate(W, max_new_tokens=4, **bad)
    assert fingerprint(s) == before


# 7. a lone surrogate stayed in `messages` (every later save failed); content None raised jinja's error
def test_invalid_text_is_refused_and_leaves_no_message(llama, tmp_path):
    s = AgentSession(llama, max_kv_mb=0.1)
    with pytest.raises(ValueError, match="not valid Unicode"):
        s.append("a\ud800b", role="user")
    with pytest.raises(ValueError, match="must be a str"):
        s.chat([{"role": "user", "content": None}])
    assert s.messages == [] and len(s.transcript_ids) == 0
    s.save(tmp_path / "ok.agentmem")


# 8. compact(method="truncate") dropped the attention sinks the docs promise to keep
def test_truncate_by_method_keeps_the_sinks(llama):
    s = AgentSession(llama, max_kv_mb=None)
    s.append(W * 6)
    s.compact(0.25, method="truncate")
    sinks = s.policy.sinks()
    for layer in s.cache.layers:
        assert layer.grid("tok", sinks).tolist() == [list(range(sinks))] * layer.num_heads


# 9. files: temp files after a kill, permissions, unreadable files, inconsistent content, load(None)
def test_stale_temp_files_of_dead_writers_are_removed(llama, tmp_path):
    s = AgentSession(llama, max_kv_mb=0.1)
    s.append(W)
    target = tmp_path / "s.agentmem"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    litter = tmp_path / f".s.agentmem.{int(dead.stdout)}.abc123.tmp"  # what a SIGKILLed save leaves
    litter.write_bytes(b"partial")
    s.save(target)
    assert not litter.exists() and temp_files(target) == []


def test_saves_keep_the_file_mode(llama, tmp_path):
    s = AgentSession(llama, max_kv_mb=0.1)
    s.append(W)
    target = tmp_path / "s.agentmem"
    s.save(target)
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask
    target.chmod(0o640)
    s.save(target)
    assert target.stat().st_mode & 0o777 == 0o640


def test_unreadable_file_says_permission_denied(llama, tmp_path, monkeypatch):
    s = AgentSession(llama, max_kv_mb=0.1)
    s.append(W)
    target = s.save(tmp_path / "s.agentmem")
    target.chmod(0o000)
    if os.geteuid() == 0:  # root reads every file: make this one unreadable to the check
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(target) else real(p, mode))
    with pytest.raises(SessionFileError, match="permission denied"):
        read_file(target, "agentmem-session")


def test_file_with_token_indices_beyond_the_transcript_is_refused(llama, tmp_path):
    s = AgentSession(llama, max_kv_mb=0.1)
    s.append(W * 2)
    tensors, meta = s.state()
    tensors["cache.layers.0.tok"] = tensors["cache.layers.0.tok"] + 1000  # consistent checksums, wrong content
    write_file(tmp_path / "bad.agentmem", "agentmem-session", tensors, meta)
    with pytest.raises(SessionFileError, match="token indices"):
        AgentSession.load(tmp_path / "bad.agentmem", model=llama)
    tensors, meta = s.state()
    meta["session"]["pinned"] = [[0, 10_000]]
    write_file(tmp_path / "bad2.agentmem", "agentmem-session", tensors, meta)
    with pytest.raises(SessionFileError, match="pinned range"):
        AgentSession.load(tmp_path / "bad2.agentmem", model=llama)


def test_load_of_none_is_a_clear_error():
    with pytest.raises(TypeError, match="path must be a str or os.PathLike"):
        AgentSession.load(None)
    with pytest.raises(TypeError, match="path must be a str"):
        read_file(None, "agentmem-session")
