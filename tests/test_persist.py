"""Saving and loading sessions: exact continuation, uneven heads, chat, wrong model, damaged files, atomicity."""

from __future__ import annotations

import json
import time

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from agentmem import AgentSession, BudgetError, persist
from agentmem.errors import ModelMismatchError, ModelNotFoundError, SessionFileError
from agentmem.models import wrap_model
from tests.helpers import TEXT, build_tiny, twin


def _continue_both(a: AgentSession, b: AgentSession, n: int = 20) -> tuple[float, list[int], list[int]]:
    """Next-token logits of both (max abs difference), then n greedy tokens from each."""
    la, lb = a.next_logits(), b.next_logits()
    diff = float((la - lb).abs().max())
    tok = int(torch.argmax(la))
    a.append_tokens([tok])
    b.append_tokens([tok])
    ra = a.generate(None, max_new_tokens=n, ignore_eos=True)
    rb = b.generate(None, max_new_tokens=n, ignore_eos=True)
    return diff, ra.token_ids, rb.token_ids


def _same_memory(a: AgentSession, b: AgentSession) -> None:
    assert a.cache.logical_length == b.cache.logical_length
    assert a.cache.position_offset == b.cache.position_offset
    for la, lb in zip(a.cache.layers, b.cache.layers):
        assert la.lengths == lb.lengths and la.caps == lb.caps
        for name in ("k", "v", "beta", "pos", "tok"):
            assert torch.equal(getattr(la, name), getattr(lb, name)), name
    assert list(a.transcript_ids) == list(b.transcript_ids) and a.engine.pending == b.engine.pending


def test_round_trip_after_compactions_continues_exactly(tiny, tmp_path):
    _, loaded = tiny
    s = AgentSession(model=loaded, max_kv_mb=0.06, policy="am-halve")
    s.append(TEXT * 3)
    s.generate(" Once", max_new_tokens=30, ignore_eos=True)
    assert len(s.compactions) >= 2
    path = s.save(tmp_path / "s.agentmem")
    t = AgentSession.load(path, model=loaded)
    _same_memory(s, t)
    assert t.stats.kv_bytes == s.stats.kv_bytes and t.max_kv_bytes == s.max_kv_bytes
    assert [e.as_dict() for e in t.compactions] == [e.as_dict() for e in s.compactions]
    assert t.policy.config == s.policy.config and t.engine.chunk_tokens == s.engine.chunk_tokens
    before = len(s.compactions)
    diff, a, b = _continue_both(s, t, 40)
    print(f"max abs logit difference after load: {diff:.3g}")
    assert diff == 0.0 and a == b
    assert len(s.compactions) > before  # the continuation compacted, with the restored query buffer
    assert [e.tokens_after for e in s.compactions] == [e.tokens_after for e in t.compactions]
    _same_memory(s, t)


def test_round_trip_with_uneven_head_budgets(tiny_llama, tmp_path):
    _, loaded = tiny_llama
    s = AgentSession(model=loaded, max_kv_mb=None)
    s.append(TEXT * 4)
    s.compact(0.25)  # offline: repeat-prefill queries, global (per-context) head budgets
    assert any(not layer.uniform for layer in s.cache.layers)  # really uneven heads
    t = AgentSession.load(s.save(tmp_path / "uneven.agentmem"), model=loaded)
    _same_memory(s, t)
    assert [layer.uniform for layer in s.cache.layers] == [layer.uniform for layer in t.cache.layers]
    diff, a, b = _continue_both(s, t)
    assert diff == 0.0 and a == b


def test_chat_session_saved_mid_conversation(tiny_llama, tmp_path):
    _, loaded = tiny_llama
    s = AgentSession(model=loaded, max_kv_mb=0.08, seed=3)
    s.append("You are terse.", role="system", pin=True)
    s.chat("Name three colours.", max_new_tokens=8)
    s.chat("And three animals?", max_new_tokens=8, temperature=0.9)  # moves the sampler's state
    t = AgentSession.load(s.save(tmp_path / "chat.agentmem"), model=loaded)
    assert t.messages == s.messages and t.chat_text == s.chat_text and t.pinned == s.pinned
    assert t.transcript() == s.transcript()
    with safe_open(str(tmp_path / "chat.agentmem"), "pt") as fh:  # the raw text is in the JSON metadata
        meta = json.loads(fh.metadata()["agentmem.meta"])
    assert meta["session"]["transcript_text"] == s.transcript() and "Name three colours." in s.transcript()
    ra = s.chat("Now a fruit.", max_new_tokens=12, temperature=0.9)  # sampled: the generator was restored
    rb = t.chat("Now a fruit.", max_new_tokens=12, temperature=0.9)
    assert ra.token_ids == rb.token_ids and s.messages == t.messages


def test_loading_into_another_model_is_a_clear_error(tiny_llama, tokenizer, tmp_path):
    _, loaded = tiny_llama
    s = AgentSession(model=loaded, max_kv_mb=None)
    s.append(TEXT)
    path = s.save(tmp_path / "s.agentmem")
    qwen = wrap_model(twin(build_tiny("qwen3", len(tokenizer))), tokenizer, name="tiny-qwen3")
    with pytest.raises(ModelMismatchError, match="tiny-llama.*tiny-qwen3"):
        AgentSession.load(path, model=qwen)
    other = wrap_model(twin(build_tiny("llama", len(tokenizer), seed=1)), tokenizer, name="tiny-llama-2")
    with pytest.raises(ModelMismatchError, match="same configuration but different weights"):
        AgentSession.load(path, model=other)
    with pytest.raises(ModelNotFoundError, match="pass model="):  # an in-process model has no name to load
        AgentSession.load(path)


def _rewrite(path, out, meta=None, header=None, tensors=None):
    """Copy a saved file, changing parts of it (checksums left as they were unless meta is given)."""
    with safe_open(str(path), "pt") as fh:
        head = dict(fh.metadata())
        data = {k: fh.get_tensor(k) for k in fh.keys()}
    if meta is not None:  # a consistent file whose content is wrong
        persist.write_file(out, persist.SESSION, tensors or data, meta)
        return
    save_file(tensors or data, str(out), metadata={**head, **(header or {})})


def test_damaged_files_are_clear_errors(tiny_llama, tmp_path):
    _, loaded = tiny_llama
    s = AgentSession(model=loaded, max_kv_mb=None)
    s.append(TEXT)
    good = s.save(tmp_path / "good.agentmem")
    raw = good.read_bytes()

    bad = tmp_path / "bad.agentmem"
    bad.write_bytes(raw[: len(raw) // 2])  # truncated
    with pytest.raises(SessionFileError, match="damaged.*save the session again"):
        AgentSession.load(bad, model=loaded)
    bad.write_bytes(raw[:-7] + bytes([raw[-7] ^ 0xFF]) + raw[-6:])  # one byte of tensor data flipped
    with pytest.raises(SessionFileError, match="tensors do not match their checksum"):
        AgentSession.load(bad, model=loaded)

    _, meta = persist.read_file(good, persist.SESSION)
    edited = json.dumps({**meta, "chunk_tokens": 3})  # JSON edited by hand
    _rewrite(good, bad, header={"agentmem.meta": edited})
    with pytest.raises(SessionFileError, match="metadata does not match its checksum"):
        AgentSession.load(bad, model=loaded)
    _rewrite(good, bad, header={"agentmem.version": "99"})
    with pytest.raises(SessionFileError, match="version '99'.*upgrade agentmem"):
        AgentSession.load(bad, model=loaded)
    _rewrite(good, bad, meta={k: v for k, v in meta.items() if k != "cache"})  # a key missing
    with pytest.raises(SessionFileError, match="damaged or incomplete.*'cache'"):
        AgentSession.load(bad, model=loaded)
    layers = [dict(m, lengths=[n + 1 for n in m["lengths"]]) for m in meta["cache"]["layers"]]
    _rewrite(good, bad, meta={**meta, "cache": {**meta["cache"], "layers": layers}})  # shapes vs metadata
    with pytest.raises(SessionFileError, match="layer 0: .*shape"):
        AgentSession.load(bad, model=loaded)
    tensors, _ = persist.read_file(good, persist.SESSION)
    tensors["cache.layers.1.v"][0, 0] = float("nan")
    _rewrite(good, bad, meta=meta, tensors=tensors)
    with pytest.raises(SessionFileError, match="NaN"):
        AgentSession.load(bad, model=loaded)
    bad.write_bytes(b"not a session")
    with pytest.raises(SessionFileError, match="not a readable safetensors file"):
        AgentSession.load(bad, model=loaded)
    with pytest.raises(SessionFileError, match="no saved session"):
        AgentSession.load(tmp_path / "missing.agentmem", model=loaded)
    assert AgentSession.load(good, model=loaded).transcript() == s.transcript()  # the good one still loads


def test_failed_save_leaves_the_old_file_intact(tiny_llama, tmp_path, monkeypatch):
    _, loaded = tiny_llama
    s = AgentSession(model=loaded, max_kv_mb=None)
    s.append(TEXT)
    path = s.save(tmp_path / "s.agentmem")
    old = path.read_bytes()
    s.append(" More text that the failed save would have written.")

    def crash(tmp, tensors, header):
        with open(tmp, "wb") as fh:
            fh.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(persist, "_write_tensors", crash)
    with pytest.raises(OSError, match="disk full"):
        s.save(path)
    assert path.read_bytes() == old and sorted(p.name for p in tmp_path.iterdir()) == ["s.agentmem"]
    monkeypatch.undo()
    t = AgentSession.load(path, model=loaded)
    assert t.transcript() == s.tokenizer.decode(list(s.transcript_ids)[: len(t.transcript_ids)])
    s.save(path)  # a later save replaces it
    assert AgentSession.load(path, model=loaded).transcript() == s.transcript()


def test_budget_too_small_for_the_saved_memory(tiny_llama, tmp_path):
    _, loaded = tiny_llama
    s = AgentSession(model=loaded, max_kv_mb=None)
    s.append(TEXT * 2)
    path = s.save(tmp_path / "s.agentmem")
    with pytest.raises(BudgetError, match=r"use max_kv_mb >= \d+\.\d\d"):
        AgentSession.load(path, model=loaded, max_kv_mb=0.03)
    t = AgentSession.load(path, model=loaded, max_kv_mb=0.5)  # a larger budget is fine
    assert t.max_kv_bytes == int(0.5 * 2**20) and t.next_logits().shape == s.next_logits().shape


@pytest.mark.slow
def test_default_model_round_trip(default_model, tmp_path):
    """The embedded default model under 4 MiB: compactions, save, load by name, identical continuation."""
    start = time.perf_counter()
    s = AgentSession(model=default_model, max_kv_mb=4)  # about 90 tokens of fp32 KV
    s.append(TEXT * 2)
    s.generate(" In summary,", max_new_tokens=30, ignore_eos=True)
    assert len(s.compactions) >= 1
    path = s.save(tmp_path / "default.agentmem")
    t = AgentSession.load(path)  # model=None: the model named in the file (smollm2-135m)
    assert t.spec.config_hash == s.spec.config_hash
    _same_memory(s, t)
    diff, a, b = _continue_both(s, t, 20)
    assert len(s.compactions) == len(t.compactions) >= 2
    print(
        f"\ndefault model: {path.stat().st_size / 2**20:.2f} MiB file, {len(s.compactions)} compactions, "
        f"max abs logit difference after load {diff:.3g}, 20 greedy tokens identical: {a == b} "
        f"({time.perf_counter() - start:.1f} s)"
    )
    assert diff < 1e-4 and a == b
