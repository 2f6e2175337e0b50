"""What must hold of a session after every operation, and a fingerprint of everything an operation
may change (to check that a failed operation, or score(), changed nothing)."""

from __future__ import annotations

import hashlib

import torch

from agentmem import AgentSession


def _digest(*tensors: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().contiguous().cpu()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def fingerprint(s: AgentSession) -> dict:
    """Everything a session operation may change: every live cache entry (keys, values, beta,
    positions, token indices), lengths and capacities, logical length and position offset, the
    query buffer, transcript, pins, pending token, chat state, ledger, sampler, policy, the archive of
    tool outputs and what recall holds."""
    c = s.cache
    layers = []
    for layer in c.layers:
        heads = [
            _digest(*(layer.head(name, h)[:n] for name in ("k", "v", "beta", "pos", "tok")))
            for h, n in enumerate(layer.lengths)
        ]
        layers.append((tuple(layer.lengths), tuple(layer.caps), tuple(heads)))
    qb = c.query_buffer
    qb_fp = None
    if qb is not None:
        rows = [_digest(qb.data[i, : qb.filled[i]], qb.pos[i, : qb.filled[i]]) for i in range(len(qb.filled))]
        qb_fp = (qb.mode, qb.capacity, tuple(qb.filled), tuple(qb.seen), tuple(rows), _digest(qb.state()[0]["rng"]))
    return {
        "layers": layers,
        "logical": c.logical_length,
        "offset": c.position_offset,
        "query_buffer": qb_fp,
        "transcript": list(s.transcript_ids),
        "pinned": list(s.pinned),
        "pending": list(s.engine.pending),
        "started": s.engine.started,
        "messages": [dict(m) for m in s.messages],
        "chat_text": s.chat_text,
        "latest_turn": s.latest_turn,
        "compactions": len(s.compactions),
        "rng": _digest(s.sampler.generator.get_state()),
        "policy": s.policy.config.model_dump(mode="json"),
        "archive": list(s.archive),
        "held": s.held,
    }


def check_invariants(s: AgentSession) -> None:
    """The budget holds, every live entry is finite and consistent with the logical length, lengths
    fit capacities, and the transcript, pins and cache are in step."""
    c = s.cache
    st = s.stats
    assert st.max_kv_bytes is None or (st.kv_bytes <= st.max_kv_bytes and st.peak_kv_bytes <= st.max_kv_bytes), st
    assert c.kv_bytes == sum(layer.nbytes for layer in c.layers)
    for i, layer in enumerate(c.layers):
        assert len(layer.lengths) == len(layer.caps) == layer.num_heads
        for h, (n, cap) in enumerate(zip(layer.lengths, layer.caps)):
            assert 0 <= n <= cap, (i, h, n, cap)
            if not n:
                continue
            k, v, beta = layer.head("k", h)[:n], layer.head("v", h)[:n], layer.head("beta", h)[:n]
            pos, tok = layer.head("pos", h)[:n].long(), layer.head("tok", h)[:n].long()
            assert torch.isfinite(k).all() and torch.isfinite(v).all(), (i, h)
            assert torch.isfinite(beta).all(), (i, h, "live entries carry a finite beta")
            assert int(tok.min()) >= 0 and int(tok.max()) < c.logical_length, (i, h, int(tok.max()), c.logical_length)
            assert int(pos.min()) >= 0 and int(pos.max()) < c.next_position, (i, h)
            assert bool((tok[1:] > tok[:-1]).all()), (i, h, "entries stay in reading order")
    assert len(s.transcript_ids) == c.logical_length + len(s.engine.pending)
    for a, b in s.pinned:
        assert 0 <= a <= b <= len(s.transcript_ids)
    qb = c.query_buffer
    if qb is not None:
        assert all(0 <= f <= qb.capacity for f in qb.filled)
        for i, f in enumerate(qb.filled):
            assert torch.isfinite(qb.data[i, :f]).all()
