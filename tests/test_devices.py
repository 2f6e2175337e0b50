"""The same sessions on every device this machine has: the CPU always, CUDA where one is present.

CUDA has never been run in CI (no GPU there); these are the checks a machine with one runs first
(``tools/gpu_check.sh``): greedy identity with transformers, budgeted generation with compactions,
heads of different sizes (one attention call per KV head) and a session saved on the device and
read back on the CPU. On a CPU-only machine the CUDA cases are skipped, the CPU ones run.
"""

from __future__ import annotations

import pytest
import torch

from agentmem import AgentSession
from agentmem.models import wrap_model
from tests.helpers import TEXT, build_tiny, twin

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]


def _models(arch: str, tokenizer, device: str, dtype: torch.dtype = torch.float32):
    """(reference HF model, agentmem LoadedModel over an identical copy), both on ``device``."""
    ref = build_tiny(arch, len(tokenizer)).to(device=device, dtype=dtype)
    return ref, wrap_model(twin(ref).to(device=device, dtype=dtype), tokenizer, name=f"tiny-{arch}")


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("device", DEVICES)
def test_greedy_matches_hf_generate_on_device(tokenizer, device, arch):
    ref, loaded = _models(arch, tokenizer, device)
    prompt = TEXT * 2  # longer than the tiny Gemma's 16-token sliding window
    ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)
    expected = ref.generate(ids, max_new_tokens=30, do_sample=False, pad_token_id=0)[0, ids.shape[1] :].tolist()
    session = AgentSession(model=loaded, max_kv_mb=None)
    assert session.generate(prompt, max_new_tokens=30).token_ids == expected
    assert session.cache.layers[0].k.device.type == device


@pytest.mark.parametrize(
    ("device", "dtype"),
    [
        ("cpu", torch.float32),
        pytest.param("cuda", torch.float32, marks=CUDA),
        pytest.param("cuda", torch.bfloat16, marks=CUDA),
    ],
)
def test_budgeted_generation_compacts_within_budget_on_device(tokenizer, device, dtype):
    """am-halve under a budget of ~40 tokens: it compacts while decoding, stays in budget, keeps
    its cache on the device and its undo copies in host memory, and its logits stay finite. (bf16 is
    a smoke test: nothing here compares its tokens with a reference.)"""
    _, loaded = _models("llama", tokenizer, device, dtype)
    probe = AgentSession(model=loaded, max_kv_mb=None)
    budget_mb = probe.cache.bytes_for_tokens(40) / 2**20
    session = AgentSession(model=loaded, max_kv_mb=budget_mb, policy="am-halve")
    result = session.generate(TEXT, max_new_tokens=80, ignore_eos=True)
    stats = session.stats
    assert len(result.token_ids) == 80 and len(session.compactions) >= 1
    assert stats.peak_kv_bytes <= stats.max_kv_bytes
    assert stats.undo_device == "cpu" and stats.peak_undo_bytes > 0  # copies were made, in host memory
    assert {layer.k.device.type for layer in session.cache.layers} == {device}
    assert {layer.k.dtype for layer in session.cache.layers} == {dtype}
    assert torch.isfinite(session.next_logits()).all()


@pytest.mark.parametrize("device", DEVICES)
def test_uneven_heads_equal_padded_layout_on_device(tokenizer, device):
    """After a compaction with global head budgets (heads of one layer keep different numbers of
    entries, attended one KV head at a time), the next tokens' logits equal those of the same cache
    with every layer padded to one capacity (one attention call per layer)."""
    _, loaded = _models("llama", tokenizer, device)
    ids = tokenizer(TEXT * 3)["input_ids"]
    session = AgentSession(model=loaded, max_kv_mb=None, policy={"name": "am-halve", "offline_head_budgets": "global"})
    session.append_tokens(ids[:-6])
    session.compact(0.4, queries="recent")
    uneven = [layer for layer in session.cache.layers if not layer.uniform]
    assert uneven, "global budgets left every layer's heads at one size; the test needs uneven ones"
    padded = session.cache.clone()
    for layer in padded.layers:
        layer.resize(layer.capacity)
    assert all(layer.uniform for layer in padded.layers)
    new = ids[-6:]
    together = session.engine.run(session.cache, new[:3], "all", None)  # a block of 3 new tokens
    steps = [session.engine.run(session.cache, [t], "all", None) for t in new[3:]]  # decode steps
    expected = [session.engine.run(padded, new[:3], "all", None)]
    expected += [session.engine.run(padded, [t], "all", None) for t in new[3:]]
    torch.testing.assert_close(torch.cat([together, *steps]), torch.cat(expected), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_session_saved_on_device_continues_on_cpu(tokenizer, device, tmp_path):
    """A compacted session saved from the device reads back on the CPU with the same next logits."""
    ref, loaded = _models("llama", tokenizer, device)
    session = AgentSession(model=loaded, max_kv_mb=None, policy={"name": "am-halve", "offline_head_budgets": "global"})
    session.append(TEXT * 2)
    session.compact(0.5)
    path = session.save(tmp_path / "s.agentmem")  # the last token read is pending: saved with it
    expected = session.next_logits().cpu()
    on_cpu = wrap_model(twin(ref).to("cpu"), tokenizer, name="tiny-llama")
    back = AgentSession.load(path, model=on_cpu)
    assert back.cache.layers[0].k.device.type == "cpu"
    torch.testing.assert_close(back.next_logits(), expected, atol=1e-4, rtol=1e-4)
