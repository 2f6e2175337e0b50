"""Cartridges: build once, save, mount into several sessions that diverge independently; errors."""

from __future__ import annotations

import pytest
import torch

from agentmem import AgentSession, BudgetError
from agentmem.cartridge import Cartridge
from agentmem.errors import AgentMemError, ModelMismatchError, SessionFileError
from agentmem.models import wrap_model
from tests.helpers import TEXT, build_tiny, twin

DOC = TEXT * 3


def test_cartridge_mounted_into_two_sessions(tiny_llama, tmp_path):
    _, loaded = tiny_llama
    built = Cartridge.build(loaded, DOC, ratio=0.25)
    assert built.compaction is not None and built.compaction.queries == "repeat-prefill"
    c = Cartridge.load(built.save(tmp_path / "doc.cartridge"))
    assert c.tokens == built.tokens > 100 and c.text == built.text
    frozen = {k: v.clone() for k, v in c.tensors.items()}

    # the reference: one session that reads the document and compacts it itself
    ref = AgentSession(model=loaded, max_kv_mb=None)
    ref.append(DOC)
    ref.compact(0.25)
    mib = c.bytes_needed(ref) / 2**20  # the smallest budget that holds the cartridge and keeps reading
    a = AgentSession(model=loaded, max_kv_mb=mib).mount(c)
    b = AgentSession(model=loaded, max_kv_mb=mib)
    b.mount(c)
    assert a.pinned == b.pinned == [(0, c.tokens)] and a.stats.logical_tokens == c.tokens - 1
    want = ref.next_logits()
    assert torch.equal(a.next_logits(), want) and torch.equal(b.next_logits(), want)  # == read and compacted
    assert a.cache.layers[0].k.data_ptr() != b.cache.layers[0].k.data_ptr()

    # the two sessions diverge, each compacting online under its budget; the cartridge never moves
    a.append(TEXT * 4)  # keeps reading at the budget bytes_needed gave
    b.append(" To be or not to be, that is the question." * 8)
    ra = a.generate(" Alpha beta gamma.", max_new_tokens=8, ignore_eos=True)
    rb = b.generate(" To be or not", max_new_tokens=8, ignore_eos=True)
    assert ra.token_ids != rb.token_ids and len(a.compactions) >= 3 and b.compactions
    assert a.stats.peak_kv_bytes <= a.max_kv_bytes and b.stats.peak_kv_bytes <= b.max_kv_bytes
    assert all(torch.equal(c.tensors[k], v) for k, v in frozen.items())
    for s in (a, b):  # pinned: every cartridge entry is still there, exactly as built
        for i, layer in enumerate(s.cache.layers):  # (keys may have been re-rotated by position maintenance)
            lengths = c.meta["cache"]["layers"][i]["lengths"]
            for h, m in enumerate(lengths):
                n = sum(lengths[:h])
                for name in ("v", "beta", "tok"):
                    assert torch.equal(layer.head(name, h)[:m], c.tensors[f"cache.layers.{i}.{name}"][n : n + m])
    # and a session mounted after all that starts from the cartridge, not from what a or b did
    d = c.session(model=loaded, max_kv_mb=mib)
    assert torch.equal(d.next_logits(), want)


def test_cartridge_errors(tiny_llama, tokenizer, tmp_path):
    _, loaded = tiny_llama
    c = Cartridge.build(loaded, DOC, ratio=0.5)
    with pytest.raises(BudgetError, match=r"cartridge holds .* use max_kv_mb >= \d+\.\d\d"):
        AgentSession(model=loaded, max_kv_mb=0.05).mount(c)
    busy = AgentSession(model=loaded, max_kv_mb=None)
    busy.append("Already reading.")
    with pytest.raises(AgentMemError, match="empty session"):
        busy.mount(c)
    qwen = wrap_model(twin(build_tiny("qwen3", len(tokenizer))), tokenizer, name="tiny-qwen3")
    fresh = AgentSession(model=qwen, max_kv_mb=None)
    with pytest.raises(ModelMismatchError, match="tiny-llama.*tiny-qwen3"):
        fresh.mount(c)
    assert fresh.cache.logical_length == 0 and not fresh.pinned  # nothing half-mounted

    path = c.save(tmp_path / "doc.cartridge")
    raw = path.read_bytes()
    path.write_bytes(raw[:-100])
    with pytest.raises(SessionFileError, match="damaged"):
        Cartridge.load(path)
    session_file = busy.save(tmp_path / "s.agentmem")
    with pytest.raises(SessionFileError, match="holds a session"):
        Cartridge.load(session_file)
    path.write_bytes(raw)
    with pytest.raises(SessionFileError, match="holds a cartridge"):
        AgentSession.load(path, model=loaded)
