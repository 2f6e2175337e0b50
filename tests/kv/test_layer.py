"""Per-head storage: non-uniform head capacities after non-uniform compaction.

Layers whose heads keep very different numbers of entries are shrunk head by head, attended one
KV head at a time without padded copies, grown per head under the budget, and still snapshot,
clone, roll back and rotate like uniform ones.
"""

from __future__ import annotations

import math
import types

import pytest
import torch

from agentmem import AgentSession
from agentmem.kv import attention
from agentmem.kv.attention import agentmem_attention_forward
from agentmem.models import wrap_model
from tests.helpers import (
    TEXT,
    build_tiny,
    layer_state,
    read_all,
    reference_logits,
    same_state,
    spread,
    subset,
    synthetic_cache,
    twin,
)


def keep_per_head(cache, layer_idx: int, keeps: list[list[int]], betas: list | None = None) -> None:
    """Replace every head of a layer by the entries ``keeps[h]`` (slot lists), via replace_spans."""
    layer = cache.layers[layer_idx]
    per_head = []
    for h, slots in enumerate(keeps):
        block = subset(layer, h, slots, None if betas is None else betas[h])
        per_head.append([(0, layer.lengths[h], block)])
    cache.replace_spans(layer_idx, per_head)


def per_head_calls(monkeypatch) -> list[int]:
    """Count calls of the per-KV-head attention path."""
    calls = [0]
    original = attention._per_head_attention

    def spy(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(attention, "_per_head_attention", spy)
    return calls


# ---------------------------------------------------------------------- memory


def test_shrink_after_nonuniform_compaction_follows_payload(tiny_llama):
    _, loaded = tiny_llama
    spec = loaded.spec
    cache = synthetic_cache(spec, 4096)
    padded = cache.kv_bytes
    for idx in range(spec.num_layers):
        keep_per_head(cache, idx, [spread(4096, 400), spread(4096, 40)])
    assert cache.kv_bytes == padded  # compaction alone releases nothing
    cache.shrink_to_fit()
    assert cache.kv_bytes <= 1.10 * cache.payload_bytes
    assert cache.kv_bytes < padded / 8
    assert cache.peak_bytes >= padded
    for layer in cache.layers:
        assert layer.lengths == [400, 40]
        assert layer.caps == [400, 48] and not layer.uniform
        held = sum(t.numel() * t.element_size() for t in (layer.k, layer.v, layer.beta, layer.pos, layer.tok))
        assert layer.nbytes == held
        # the accessors agree with each other on the flat layout
        tok_grid = layer.grid("tok", 400)
        assert tok_grid.shape == (2, 400)
        assert torch.equal(tok_grid[1, :40], layer.head("tok", 1)[:40])
        assert torch.equal(tok_grid[0], torch.tensor(spread(4096, 400), dtype=torch.int32))
        heads = torch.tensor([1, 0])
        slots = torch.tensor([[0, 5, 39], [1, 2, 399]])
        got = layer.gather("k", heads, slots)  # (2, 3, d)
        assert torch.equal(got[0], layer.head("k", 1)[[0, 5, 39]])
        assert torch.equal(got[1], layer.head("k", 0)[[1, 2, 399]])
        assert torch.isinf(layer.head("beta", 1)[40:]).all()
        with pytest.raises(RuntimeError, match="uniform"):
            layer.kv4d(40)


def test_even_layers_stay_uniform(tiny_llama):
    """Appending to equal heads and shrinking them keeps the (H, cap, d) grid and its free views."""
    _, loaded = tiny_llama
    cache = synthetic_cache(loaded.spec, 100)
    cache.shrink_to_fit(spare=8)
    for layer in cache.layers:
        assert layer.uniform and layer.caps == [112, 112]
        k, v = layer.kv4d(100)
        assert k.shape == (1, 2, 100, loaded.spec.head_dim) and k.data_ptr() == layer.k.data_ptr()
        assert layer.grid("pos", 100).data_ptr() == layer.pos.data_ptr()


# ---------------------------------------------------------------------- attention


def test_nonuniform_attention_equals_masked_recompute(tiny, tokenizer, monkeypatch):
    """Heads of different capacities, same keys evicted: chunk and decode logits == HF recompute."""
    ref, loaded = tiny
    ids = tokenizer(TEXT * 2)["input_ids"]
    prefix, new = ids[:30], ids[30:37]
    evicted = range(5, 13)
    s = AgentSession(model=loaded, max_kv_mb=None)
    read_all(s, prefix)
    for idx, layer in enumerate(s.cache.layers):
        s.cache.evict_all_heads(idx, 5, 13)
        layer.resize([24, 64])  # same lengths, different capacities
        assert not layer.uniform
    calls = per_head_calls(monkeypatch)
    chunk = s.engine.run(s.cache, new[:4], "all", None)  # n > 1
    steps = [s.engine.run(s.cache, [t], "all", None) for t in new[4:]]  # n = 1
    got = torch.cat([chunk, *steps])
    assert calls[0] == len(s.cache.layers) * 4
    hidden = {(q, k) for q in range(30, 37) for k in evicted}
    expected = reference_logits(ref, prefix + new, hidden)[30:]
    torch.testing.assert_close(got, expected, atol=2e-4, rtol=1e-4)


def decode_path(monkeypatch, path: str) -> None:
    """Route decode steps over non-uniform fp32 CPU layers: "flat" (one product over all of a layer's
    slots), "heads" (products per KV head) or "sdpa" (one SDPA call per KV head)."""
    monkeypatch.setattr(attention, "PRODUCTS_DECODE", path != "sdpa")
    monkeypatch.setattr(attention, "FLAT_DECODE_SLOTS", 0 if path == "heads" else 10**9)


DECODE_PATHS = ["flat", "heads", "sdpa"]


@pytest.mark.parametrize("path", DECODE_PATHS)
def test_nonuniform_attention_equals_padded_layout(tiny, tokenizer, monkeypatch, path):
    """Different entries and beta per head: per-head attention == the padded (uniform) layout, with
    decode steps through each path (products over the whole layer or per head: the fp32 CPU paths;
    SDPA per head)."""
    decode_path(monkeypatch, path)
    _, loaded = tiny
    ids = tokenizer(TEXT * 2)["input_ids"]
    prefix, new = ids[:30], ids[30:37]
    a = AgentSession(model=loaded, max_kv_mb=None)
    b = AgentSession(model=loaded, max_kv_mb=None)
    read_all(a, prefix)
    read_all(b, prefix)
    g = torch.Generator().manual_seed(1)
    keeps = [spread(30, 28), [0, 1, 7, 20, 28, 29]]  # head 0 keeps 28 entries, head 1 six
    for idx in range(len(a.cache.layers)):
        betas = [torch.rand(len(k), generator=g) * 2 - 1 for k in keeps]
        keep_per_head(a.cache, idx, keeps, betas)
        keep_per_head(b.cache, idx, keeps, betas)
        b.cache.layers[idx].resize(64)  # padded: both heads in a 64-slot grid
    a.cache.shrink_to_fit()
    assert all(layer.caps == [32, 16] and layer.has_beta for layer in a.cache.layers)
    calls = per_head_calls(monkeypatch)
    got = [a.engine.run(a.cache, new[:4], "all", None)] + [a.engine.run(a.cache, [t], "all", None) for t in new[4:]]
    n_a = calls[0]
    expected = [b.engine.run(b.cache, new[:4], "all", None)] + [
        b.engine.run(b.cache, [t], "all", None) for t in new[4:]
    ]
    assert n_a == len(a.cache.layers) * 4 and calls[0] == n_a  # a: per head every step; b: never
    assert all(not layer.uniform for layer in a.cache.layers)
    assert all(layer.uniform for layer in b.cache.layers)
    torch.testing.assert_close(torch.cat(got), torch.cat(expected), atol=1e-4, rtol=1e-4)


def _dense(layer, query, scale, first_pos, softcap=None) -> torch.Tensor:
    """Reference attention from the layer's per-head entries, spelled out: (1, n, H_q, d_v)."""
    _, hq, n, _ = query.shape
    rep = hq // layer.num_heads
    out = []
    for qh in range(hq):
        h = qh // rep
        length = layer.lengths[h]
        k, v = layer.head("k", h)[:length], layer.head("v", h)[:length]
        s = query[0, qh] @ k.T * scale  # (n, L)
        if softcap is not None:
            s = torch.tanh(s / softcap) * softcap
        s = s + layer.head("beta", h)[:length]
        i = torch.arange(n)[:, None]
        j = torch.arange(length)[None, :]
        hide = j > length - n + i
        if layer.sliding_window is not None:
            qpos = first_pos + torch.arange(n)[:, None]
            hide |= qpos - layer.head("pos", h)[:length][None, :] >= layer.sliding_window
        out.append(torch.softmax(s.masked_fill(hide, -math.inf), dim=-1) @ v)
    return torch.stack(out)[None].transpose(1, 2)


@pytest.mark.parametrize("path", DECODE_PATHS)
@pytest.mark.parametrize("softcap", [None, 20.0])
@pytest.mark.parametrize("n", [1, 5])
def test_per_head_attention_sliding_window_and_softcap(tokenizer, monkeypatch, n, softcap, path):
    """Synthetic Gemma 3 layers (GQA, beta, sliding windows), both layouts, every decode path, against
    a dense reference."""
    decode_path(monkeypatch, path)
    products = path != "sdpa"
    decodes = [0]
    original = attention._per_head_decode

    def spy(*args):
        decodes[0] += 1
        return original(*args)

    monkeypatch.setattr(attention, "_per_head_decode", spy)
    loaded = wrap_model(twin(build_tiny("gemma3", len(tokenizer))), tokenizer, name="tiny-gemma3")
    spec = loaded.spec
    assert any(w is not None for w in spec.sliding_window) and spec.num_q_heads > spec.num_kv_heads
    g = torch.Generator().manual_seed(3)
    betas = [[torch.randn(34, generator=g), torch.full((9,), 0.5)] for _ in range(spec.num_layers)]
    caches = []
    for shrink in (True, False):
        cache = synthetic_cache(spec, 40, seed=5)
        for idx in range(spec.num_layers):
            keep_per_head(cache, idx, [spread(40, 34), [0, 3, 10, 24, 30, 35, 37, 38, 39]], betas[idx])
        if shrink:
            cache.shrink_to_fit()
        else:
            for layer in cache.layers:
                layer.resize(64)
        caches.append(cache)
    torch.manual_seed(7)
    kn = torch.randn(1, spec.num_kv_heads, n, spec.head_dim)
    vn = torch.randn(1, spec.num_kv_heads, n, spec.v_head_dim)
    query = torch.randn(1, spec.num_q_heads, n, spec.head_dim)
    outs = []
    for cache in caches:
        cache.reserve(n)
        cache.begin_forward(n)
        res = []
        for idx in range(spec.num_layers):
            key, value = cache.update(kn, vn, idx)
            module = types.SimpleNamespace(layer_idx=idx, is_causal=True)
            scale = spec.scaling[idx]
            kwargs = {"agentmem_cache": cache} | ({"softcap": softcap} if softcap is not None else {})
            out, _ = agentmem_attention_forward(module, query, key, value, None, scaling=scale, **kwargs)
            layer = cache.layers[idx]
            torch.testing.assert_close(
                out, _dense(layer, query, scale, cache.step_first_pos, softcap), atol=1e-5, rtol=1e-5
            )
            res.append(out)
        outs.append(torch.stack(res))
        cache.commit_forward(n)
    assert not caches[0].layers[0].uniform and caches[1].layers[0].uniform
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)
    # the products path takes decode steps without softcap on layers no window hides anything of
    assert (decodes[0] > 0) == (products and n == 1 and softcap is None)
    assert decodes[0] < spec.num_layers  # the sliding layers, whose window hides slots here, keep SDPA


def test_nonuniform_appends_land_in_each_heads_run(tiny_llama):
    """Appends one token at a time (the cached slot index), a rollback, then a block of two: every
    head's run holds exactly what a uniform layer given the same appends holds."""
    _, loaded = tiny_llama
    spec = loaded.spec
    caches = []
    for shrink in (True, False):
        cache = synthetic_cache(spec, 40, seed=2)
        for idx in range(spec.num_layers):
            keep_per_head(cache, idx, [spread(40, 30), spread(40, 7)])
        if shrink:
            cache.shrink_to_fit(spare=2)  # room for two appends, then per-head growth
        caches.append(cache)
    g = torch.Generator().manual_seed(4)
    steps = [torch.randn(2, 1, spec.num_kv_heads, n, spec.head_dim, generator=g) for n in (1, 1, 1, 1, 2)]

    def append(cache, kv):
        n = kv.shape[-2]
        cache.reserve(n)
        cache.begin_forward(n)
        for idx in range(spec.num_layers):
            cache.update(kv[0], kv[1], idx)
        cache.commit_forward(n)

    for cache in caches:
        for kv in steps[:3]:
            append(cache, kv)
        lengths = cache.snapshot_lengths()
        append(cache, steps[3])
        cache.rollback(lengths)
        cache.logical_length -= 1
        append(cache, steps[4])
    a, b = caches[0].layers[0], caches[1].layers[0]
    assert not a.uniform and b.uniform and a.lengths == b.lengths == [35, 12]
    for h, n in enumerate(a.lengths):
        for name in ("k", "v", "beta", "pos", "tok"):
            assert torch.equal(a.head(name, h)[:n], b.head(name, h)[:n]), (h, name)
        appended = torch.cat([steps[i][0][0, h] for i in (0, 1, 2, 4)])  # (5, d): the rolled-back step is gone
        assert torch.equal(a.head("k", h)[n - 5 : n], appended) and not a.head("beta", h)[n - 5 : n].any()
        assert a.head("pos", h)[n - 5 : n].tolist() == list(range(40, 45))


# ---------------------------------------------------------------------- growth and budget


def test_nonuniform_heads_grow_per_head_within_budget(tiny_llama):
    _, loaded = tiny_llama
    cache = synthetic_cache(loaded.spec, 512)
    for idx in range(len(cache.layers)):
        keep_per_head(cache, idx, [spread(512, 400), spread(512, 40)])
    cache.shrink_to_fit()
    cache.reserve(5)  # head 0 is full (400/400), head 1 has room (40/48)
    for layer in cache.layers:
        assert layer.caps[1] == 48 and layer.caps[0] == 608  # geometric growth of head 0 only
    # a budget that holds the exact sizes but not geometric growth: exact, and never exceeded
    cache.shrink_to_fit()
    slot = cache.layers[0].head_slot_bytes()
    # exact growth: +32 slots per layer, and one layer's new 480-slot buffer next to its old one
    cache.max_bytes = cache.kv_bytes + (len(cache.layers) * 32 + 480) * slot
    cache.peak_bytes = cache.kv_bytes
    assert cache.fits(20) and not cache.fits(40)
    cache.reserve(20)
    for layer in cache.layers:
        assert layer.caps == [420, 60]
    assert cache.peak_bytes <= cache.max_bytes
    spec = loaded.spec
    cache.begin_forward(20)
    for idx in range(len(cache.layers)):
        cache.update(torch.randn(1, 2, 20, spec.head_dim), torch.randn(1, 2, 20, spec.v_head_dim), idx)
    cache.commit_forward(20)
    assert all(layer.lengths == [420, 60] for layer in cache.layers)
    assert cache.peak_bytes <= cache.max_bytes


def test_generation_continues_after_nonuniform_compaction(tiny, tokenizer):
    _, loaded = tiny
    s = AgentSession(model=loaded, max_kv_mb=0.12, policy="streaming")
    read_all(s, tokenizer(TEXT * 4)["input_ids"][:80])
    cache = s.cache
    for idx, layer in enumerate(cache.layers):
        n0, n1 = layer.lengths
        keep_per_head(cache, idx, [spread(n0, n0 - 4), spread(n1, 12)])
    cache.shrink_to_fit()
    before = [layer.caps for layer in cache.layers]
    assert any(c[0] > c[1] for c in before)
    r = s.generate(" The", max_new_tokens=60, ignore_eos=True)
    assert r.stats.generated_tokens == 60
    assert s.stats.peak_kv_bytes <= s.max_kv_bytes and cache.kv_bytes <= s.max_kv_bytes
    assert any(layer.caps != c for layer, c in zip(cache.layers, before))  # heads grew (or were compacted)
    assert math.isfinite(float(s.score(" and the lazy dog")))
    assert torch.isfinite(s.next_logits()).all()


def test_am_compaction_of_nonuniform_layers(tiny_llama, tokenizer):
    """Attention Matching reads a non-uniform layer through head() / gather()."""
    _, loaded = tiny_llama
    s = AgentSession(model=loaded, max_kv_mb=None, policy="am-halve-uniform")  # every head shrinks
    s.append(TEXT * 4)
    cache = s.cache
    for idx, layer in enumerate(cache.layers):
        n0, n1 = layer.lengths
        keep_per_head(cache, idx, [list(range(n0)), list(range(8)) + list(range(n1 - 40, n1))])
    cache.shrink_to_fit()
    assert all(not layer.uniform for layer in cache.layers)
    lengths = [list(layer.lengths) for layer in cache.layers]
    ev = s.compact(0.5, queries="recent")
    assert ev.method == "am" and math.isfinite(ev.fit_output_error)
    for layer, lens in zip(cache.layers, lengths):
        assert all(after < before for after, before in zip(layer.lengths, lens))
        for h, n in enumerate(layer.lengths):
            assert torch.isfinite(layer.head("beta", h)[:n]).all()
            pos = layer.head("pos", h)[:n]
            assert torch.all(pos[1:] >= pos[:-1])
    assert math.isfinite(float(s.score(" The quick brown fox")))


# ---------------------------------------------------------------------- state


def test_snapshot_clone_rollback_rotate_nonuniform(tiny_llama):
    _, loaded = tiny_llama
    cache = synthetic_cache(loaded.spec, 200)
    for idx in range(len(cache.layers)):
        keep_per_head(cache, idx, [spread(200, 150), spread(200, 20)])
    cache.shrink_to_fit()
    layer = cache.layers[1]
    start = layer_state(layer)

    # snapshot / restore across an append and an edit
    snap = layer.snapshot()
    cache.reserve(3)
    cache.begin_forward(3)
    for idx in range(len(cache.layers)):
        cache.update(torch.randn(1, 2, 3, 16), torch.randn(1, 2, 3, 16), idx)
    cache.commit_forward(3)
    cache.replace_spans(1, [[(0, 10, None)], [(0, 2, None)]])
    assert layer.lengths == [143, 21]
    layer.restore(snap)
    assert same_state(layer_state(layer), start) and not layer.uniform

    # clone: same layout and content, independent buffers
    other = cache.clone()
    assert same_state(layer_state(other.layers[1]), start)
    other.replace_spans(1, [[(0, 50, None)], [(0, 5, None)]])
    assert same_state(layer_state(layer), start)

    # rollback of a forward: appended entries vanish, padding is padding again
    lengths = cache.snapshot_lengths()
    cache.reserve(4)
    caps = layer.caps
    cache.begin_forward(4)
    for idx in range(len(cache.layers)):
        cache.update(torch.randn(1, 2, 4, 16), torch.randn(1, 2, 4, 16), idx)
    cache.rollback(lengths)
    assert layer.lengths == start[1] and layer.caps == caps
    for h, n in enumerate(layer.lengths):
        assert torch.equal(layer.head("k", h)[:n], start[2 + 5 * h][:n])
        assert torch.isinf(layer.head("beta", h)[n:]).all() and not layer.head("k", h)[n:].any()

    # rotation there and back, per head, with positions recorded
    pos0 = layer.grid("pos", 150).clone()
    delta = torch.randint(-30, 30, (2, 150))
    layer.rotate(delta, loaded.spec.inv_freq[1])
    valid = layer.valid_mask()
    assert torch.equal(layer.grid("pos", 150)[valid], (pos0 + delta.int())[valid])
    layer.rotate(-delta, loaded.spec.inv_freq[1])
    for h, n in enumerate(layer.lengths):
        torch.testing.assert_close(layer.head("k", h)[:n], start[2 + 5 * h][:n], atol=1e-5, rtol=1e-5)


def test_decode_over_nonuniform_layer_under_cpu_autocast(tiny_llama, tokenizer):
    """A bf16 scratch pass (CPU autocast) decoding over non-uniform fp32 layers runs (SDPA's path,
    not the fp32 products) and stays close to the fp32 step."""
    _, loaded = tiny_llama
    ids = tokenizer(TEXT * 2)["input_ids"]
    s = AgentSession(model=loaded, max_kv_mb=None)
    read_all(s, ids[:30])
    for idx in range(len(s.cache.layers)):
        keep_per_head(s.cache, idx, [spread(30, 28), spread(30, 6)])
    s.cache.shrink_to_fit()
    assert not any(layer.uniform for layer in s.cache.layers)
    exact = s.engine.run(s.cache.clone(), ids[30:31], "all", None)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = s.engine.run(s.cache, ids[30:31], "all", None)
    torch.testing.assert_close(got, exact, atol=0.1, rtol=0.05)


def test_nonuniform_layout_releases_the_uniform_buffers(tiny_llama):
    """Once a layer's heads get their own capacities, nothing keeps the old (H, cap) buffers alive."""
    import gc
    import weakref

    _, loaded = tiny_llama
    cache = synthetic_cache(loaded.spec, 64)
    layer = cache.layers[0]
    old_k, old_v = weakref.ref(layer.k), weakref.ref(layer.v)
    keep_per_head(cache, 0, [spread(64, 60), spread(64, 8)])
    cache.shrink_to_fit()
    assert not layer.uniform
    gc.collect()
    assert old_k() is None and old_v() is None
