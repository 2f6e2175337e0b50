"""The session file format (sessions and cartridges): one safetensors file with JSON metadata in its header.

This module knows the format only: writing and reading files atomically and verified, the model
identity a file records, and the validation of a file's session part. The session serialises
itself (:meth:`~agentmem.session.Session.state` / ``load_state``, as each cache layer does); a
saved session continues exactly where it stopped: same cache entries, capacities and positions,
same pending token, query buffer, sampler state, policy and compaction ledger, so the next-token
logits and every later compaction are those the original session would have produced.

File format, version 1. The file is a plain safetensors file (``safetensors.safe_open`` reads it);
its header ``__metadata__`` holds five strings:

* ``agentmem.format``: ``"agentmem-session"`` or ``"agentmem-cartridge"``
* ``agentmem.version``: ``"1"``
* ``agentmem.meta``: the JSON document below
* ``agentmem.meta_sha256`` / ``agentmem.data_sha256``: sha256 of that JSON text, and of every tensor
  (name, dtype, shape and bytes, in name order); any edit or truncation is detected on load.

Tensors (all on the CPU)::

    cache.layers.{i}.k / .v      (P_i, d) / (P_i, d_v)  model dtype; P_i = entries of layer i, head-major
    cache.layers.{i}.beta        (P_i,) float32         additive attention bias of each entry
    cache.layers.{i}.pos / .tok  (P_i,) int32           RoPE position baked into each key / token index
    query_buffer.data / .pos     (layers, rows, H_q, d) / (layers, rows)  buffered reference queries
    query_buffer.rng             uint8                  the reservoir sampler's generator state
    transcript_ids               (T,) int32             every token read or sampled
    sampler_rng                  uint8                  the session sampler's generator state

JSON metadata: ``model`` (name, path, model_type, config_hash, dtype, device, and a fingerprint of
sampled weights), ``cache`` (logical length, position offset, peak and current bytes, dtype, per
layer the per-head ``lengths`` and ``caps``), ``query_buffer`` (mode, capacity, filled / seen per
layer; null without a buffer), ``policy`` (the policy config, pydantic ``model_dump``), ``positions``,
``max_kv_bytes``, ``chunk_tokens``, ``session`` (``pending`` tokens, ``started``, chat ``messages``,
``chat_text``, ``tools``, ``latest_turn``, ``pinned`` ranges, ``pin_turn``, ``auto_recall``, ``held``
(the pinned ranges recall keeps exact until the next reply), ``archive``: the tool outputs recall()
may search, ``compactions``: the ledger as ``CompactionEvent.as_dict``, and
``transcript_text``: the raw text of everything read or generated, for people and tools),
``stats`` (informational) and ``agentmem_version``.

Writes are atomic: the file is written in a temporary directory next to the target, synced, then
``os.replace``-d over the target; a failed save leaves an existing file untouched.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import ModelNotFoundError, SessionFileError
from .files import atomic_write
from .identity import dtype_name
from .models import EMBEDDED_HINTS

FORMAT_VERSION = 1
SESSION = "agentmem-session"
CARTRIDGE = "agentmem-cartridge"


# ---------------------------------------------------------------------- file level
def file_path(path, what: str = "session") -> Path:
    """``path`` as a Path; a clear TypeError for anything that is not a path."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"the {what} file path must be a str or os.PathLike, not {type(path).__name__}")
    return Path(path)


def write_file(path: str | os.PathLike, kind: str, tensors: dict[str, torch.Tensor], meta: dict) -> Path:
    """Write ``tensors`` and ``meta`` (JSON-serialisable) atomically to ``path``; returns the path."""
    path = file_path(path, "session" if kind == SESSION else "cartridge")
    text = json.dumps(meta, ensure_ascii=False)
    header = {
        "agentmem.format": kind,
        "agentmem.version": str(FORMAT_VERSION),
        "agentmem.meta": text,
        "agentmem.meta_sha256": hashlib.sha256(text.encode()).hexdigest(),
        "agentmem.data_sha256": _data_digest(tensors),
    }
    return atomic_write(path, lambda tmp: _write_tensors(tmp, tensors, header))


def _write_tensors(path: str, tensors: dict[str, torch.Tensor], header: dict[str, str]) -> None:
    save_file({k: v.contiguous() for k, v in tensors.items()}, path, metadata=header)


def _data_digest(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        digest.update(f"{name}|{dtype_name(t.dtype)}|{tuple(t.shape)}|".encode())
        if t.numel():
            digest.update(t.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def read_file(path: str | os.PathLike, kind: str) -> tuple[dict[str, torch.Tensor], dict]:
    """Read and verify a file written by :func:`write_file`; :class:`SessionFileError` if it is not one."""
    what = "session" if kind == SESSION else "cartridge"
    path = file_path(path, what)
    if not path.is_file():
        raise SessionFileError(f"no saved {what} at {path}" + (" (it is a directory)" if path.is_dir() else ""))
    if not os.access(path, os.R_OK):
        raise SessionFileError(f"{path} cannot be read (permission denied): give this user read access to it")
    damaged = f"{path} is damaged ({{}}): restore it from a backup or save the {what} again"
    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            header = fh.metadata() or {}
            tensors = {name: fh.get_tensor(name) for name in fh.keys()}
    except PermissionError as exc:
        raise SessionFileError(f"{path} cannot be read ({exc}): give this user read access to it") from exc
    except Exception as exc:  # safetensors raises its own error type for truncated or garbled files
        raise SessionFileError(damaged.format(f"not a readable safetensors file: {exc}")) from exc
    found = header.get("agentmem.format")
    if found not in (SESSION, CARTRIDGE):
        raise SessionFileError(f"{path} is a safetensors file but not an agentmem {what}")
    if found != kind:
        other = "a session (use AgentSession.load)" if found == SESSION else "a cartridge (use Cartridge.load)"
        raise SessionFileError(f"{path} holds {other}, not a {what}")
    version = header.get("agentmem.version")
    if version != str(FORMAT_VERSION):
        newer = version is not None and version.isdigit() and int(version) > FORMAT_VERSION
        fix = "upgrade agentmem to read it" if newer else "save it again with this version of agentmem"
        raise SessionFileError(
            f"{path} uses {what} format version {version!r}; this agentmem reads {FORMAT_VERSION}: {fix}"
        )
    text = header.get("agentmem.meta", "")
    if hashlib.sha256(text.encode()).hexdigest() != header.get("agentmem.meta_sha256"):
        raise SessionFileError(damaged.format("its metadata does not match its checksum"))
    if _data_digest(tensors) != header.get("agentmem.data_sha256"):
        raise SessionFileError(damaged.format("its tensors do not match their checksum"))
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SessionFileError(damaged.format(f"its metadata is not JSON: {exc}")) from exc
    if not isinstance(meta, dict):
        raise SessionFileError(damaged.format("its metadata is not a JSON object"))
    return tensors, meta


def model_source(saved: dict, what: str) -> str:
    """What to pass to ``load_model`` to get the model ``saved`` (a file's ``model`` entry) names."""
    name, where = saved.get("name"), saved.get("path")
    if name in EMBEDDED_HINTS:
        return name
    if where and where != "." and Path(where).exists():
        return where
    raise ModelNotFoundError(
        f"{what} was saved from model {name!r} ({where if where not in (None, '.') else 'built in-process'}), "
        "which cannot be found here: pass model="
    )
