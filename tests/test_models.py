"""Model resolution: embedded chunked GGUFs (assembly, hash, errors) and the forward's cache keyword."""

from __future__ import annotations

import hashlib
import sys
import warnings

import pytest

from agentmem import AgentSession, ModelNotFoundError
from agentmem.models import ChunkedGGUF, cache_keyword


def _fake_parts(tmp_path, monkeypatch, blobs: list[bytes]) -> list[str]:
    """Packages fakepart1..N on sys.path, each holding data/partNN.bin."""
    modules = []
    for i, blob in enumerate(blobs, 1):
        pkg = tmp_path / "site" / f"fakepart{i}"
        (pkg / "data").mkdir(parents=True)
        (pkg / "__init__.py").write_text("")
        (pkg / "data" / f"part{i:02d}.bin").write_bytes(blob)
        modules.append(f"fakepart{i}")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    for m in modules:
        sys.modules.pop(m, None)
    return modules


def _chunked(modules, blobs, sha=None) -> ChunkedGGUF:
    whole = b"".join(blobs)
    return ChunkedGGUF(
        file_name="fake.gguf",
        modules=tuple(modules),
        parts=tuple(f"part{i:02d}.bin" for i in range(1, len(modules) + 1)),
        size=len(whole),
        sha256=sha or hashlib.sha256(whole).hexdigest(),
        pip="pip install fakepart1 fakepart2",
    )


def test_chunked_gguf_is_joined_once_and_checked(tmp_path, monkeypatch):
    blobs = [b"GGUF" + b"a" * 1000, b"b" * 777]
    modules = _fake_parts(tmp_path, monkeypatch, blobs)
    c = _chunked(modules, blobs)
    out = c.assemble(tmp_path / "cache")
    assert out.read_bytes() == b"".join(blobs)
    assert c.assemble(tmp_path / "cache") == out  # already there: reused
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["fake.gguf"]  # no temp file left


def test_chunked_gguf_errors_name_the_pip_command(tmp_path, monkeypatch):
    blobs = [b"x" * 10, b"y" * 10]
    modules = _fake_parts(tmp_path, monkeypatch, blobs)
    with pytest.raises(ModelNotFoundError, match="pip install fakepart1 fakepart2"):
        _chunked(modules, blobs, sha="0" * 64).assemble(tmp_path / "cache")
    assert not (tmp_path / "cache" / "fake.gguf").exists()
    assert list((tmp_path / "cache").iterdir()) == []  # the failed join left nothing behind
    with pytest.raises(ModelNotFoundError, match="not installed: run `pip install fakepart1"):
        _chunked(["fakepart1", "no_such_part_pkg"], blobs).assemble(tmp_path / "cache")
    (tmp_path / "site" / "fakepart2" / "data" / "part02.bin").unlink()
    with pytest.raises(ModelNotFoundError, match="missing: reinstall"):
        _chunked(modules, blobs).assemble(tmp_path / "cache")


def test_forward_uses_the_cache_keyword_of_this_transformers(tiny_llama):
    _, loaded = tiny_llama
    assert loaded.cache_keyword == cache_keyword(loaded.model) in ("cache", "past_key_values")
    s = AgentSession(model=loaded, max_kv_mb=None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no deprecation warning from the forward
        assert s.generate("hello there", max_new_tokens=3).stats.generated_tokens == 3


def test_a_model_id_in_the_local_hf_cache_resolves_offline(tmp_path, monkeypatch, tiny_llama, tokenizer):
    ref, _ = tiny_llama
    snapshot = tmp_path / "hub" / "models--acme--tiny" / "snapshots" / ("0" * 40)
    ref.save_pretrained(snapshot)
    tokenizer.save_pretrained(snapshot)
    (tmp_path / "hub" / "models--acme--tiny" / "refs").mkdir()
    (tmp_path / "hub" / "models--acme--tiny" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    s = AgentSession("acme/tiny", max_kv_mb=None)
    assert s.spec.name == "acme/tiny" and s.generate("Hello", max_new_tokens=2).token_ids
    with pytest.raises(ModelNotFoundError, match="local Hugging Face cache"):
        AgentSession("acme/absent", max_kv_mb=None)
