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
import logging
import os
from array import array
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import ModelMismatchError, ModelNotFoundError, SessionFileError
from .events import Archived, CompactionEvent
from .files import atomic_write
from .models import EMBEDDED_HINTS, LoadedModel

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
SESSION = "agentmem-session"
CARTRIDGE = "agentmem-cartridge"
_FINGERPRINT_PARAMS = 6  # parameters sampled (evenly over the model) ...
_FINGERPRINT_VALUES = 16  # ... and values sampled (evenly over each parameter)


# ---------------------------------------------------------------------- model identity
def weights_fingerprint(model: torch.nn.Module) -> dict:
    """A few weights sampled evenly over the model: tells apart models that share a config."""
    params = [(n, p) for n, p in model.named_parameters() if p.device.type != "meta" and p.numel()]
    if not params:
        return {"names": [], "values": []}
    picks = _evenly(len(params), _FINGERPRINT_PARAMS)
    names, values = [], []
    for i in dict.fromkeys(picks):
        name, p = params[i]
        flat = p.detach().reshape(-1)
        idx = torch.tensor(_evenly(flat.numel(), _FINGERPRINT_VALUES), device=flat.device)
        names.append(name)
        values.append([float(x) for x in flat[idx].float().cpu()])
    return {"names": names, "values": values}


def _evenly(n: int, k: int) -> list[int]:
    """k indices spread evenly over range(n), first and last included (exact integer arithmetic)."""
    k = min(k, n)
    return [i * (n - 1) // max(1, k - 1) for i in range(k)]


def model_identity(loaded: LoadedModel) -> dict:
    """What a file records about its model (checked by :func:`check_model`)."""
    return {
        "name": loaded.name,
        "path": str(loaded.path),
        "model_type": loaded.spec.model_type,
        "config_hash": loaded.spec.config_hash,
        "dtype": dtype_name(loaded.dtype),
        "device": str(loaded.device),
        "fingerprint": weights_fingerprint(loaded.model),
    }


def check_model(saved: dict, loaded: LoadedModel, source: str) -> None:
    """Raise :class:`ModelMismatchError` unless ``loaded`` is the model ``saved`` describes.

    The config hash (``ModelSpec.config_hash``) must match; sampled weights must agree to within
    bf16 rounding (so fp32 and bf16 copies of one model match, a fine-tune does not).
    """
    here = f"{loaded.name!r} ({loaded.spec.model_type}, config {loaded.spec.config_hash}, {dtype_name(loaded.dtype)})"
    there = (
        f"{saved.get('name')!r} ({saved.get('model_type')}, config {saved.get('config_hash')}, {saved.get('dtype')})"
    )
    if saved.get("config_hash") != loaded.spec.config_hash:
        hint = ""
        if saved.get("dtype") != dtype_name(loaded.dtype) and saved.get("model_type") == loaded.spec.model_type:
            hint = f" (the config hash includes the dtype the model was loaded in: try dtype={saved.get('dtype')!r})"
        raise ModelMismatchError(
            f"{source} was saved from model {there}, not from {here}{hint}; load it with that model "
            "(or model=None to load the model named in the file)"
        )
    fp, mine = saved.get("fingerprint") or {}, weights_fingerprint(loaded.model)
    if fp.get("names") != mine["names"] or not all(
        _close(a, b) for xs, ys in zip(fp.get("values", []), mine["values"]) for a, b in zip(xs, ys)
    ):
        raise ModelMismatchError(
            f"{source} was saved from model {there}; {here} has the same configuration but different weights. "
            "Load it with the model that wrote it."
        )


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-2 * max(abs(a), abs(b)) + 1e-6


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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


# ---------------------------------------------------------------------- session state
def sub(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The tensors named ``prefix...``, with the prefix taken off."""
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


class SessionFields:
    """The python values of a file's ``session`` part and transcript, checked before anything is written."""

    def __init__(self, tensors: dict[str, torch.Tensor], meta: dict, vocab: int):
        s = meta["session"]
        ids = tensors["transcript_ids"]
        if ids.dtype != torch.int32 or ids.dim() != 1:
            raise ValueError("transcript_ids must be a 1-d int32 tensor")
        self.transcript = array("i", ids.tolist())
        self.pending = [int(i) for i in s["pending"]]
        if any(not 0 <= i < vocab for i in self.pending) or (
            len(ids) and not 0 <= int(ids.min()) <= int(ids.max()) < vocab
        ):
            raise ValueError(f"token ids outside the model's vocabulary [0, {vocab})")
        self.started = bool(s["started"])
        self.messages = list(s["messages"])
        self.chat_text = str(s["chat_text"])
        self.tools = s.get("tools")
        self.latest_turn = tuple(s["latest_turn"]) if s.get("latest_turn") is not None else None
        self.pinned = [(int(a), int(b)) for a, b in s["pinned"]]
        self.archive = [Archived(str(n), int(a), int(b)) for n, a, b in s.get("archive", [])]
        self.held = [(int(a), int(b)) for a, b in s.get("held", [])]
        if any(h not in self.pinned for h in self.held):
            raise ValueError("a held range is not among the pinned ranges")
        self.pin_turn = float(s.get("pin_turn", 0.75))
        if not 0 <= self.pin_turn <= 1:
            raise ValueError(f"pin_turn {self.pin_turn} outside [0, 1]")
        self.auto_recall = s.get("auto_recall", False)
        if not isinstance(self.auto_recall, bool):
            raise ValueError(f"auto_recall must be true or false (got {self.auto_recall!r})")
        self.compactions = [CompactionEvent(**e) for e in s["compactions"]]
        self.rng = tensors["sampler_rng"]
        if self.rng.dtype != torch.uint8:
            raise ValueError("sampler_rng must be a uint8 tensor")


def _check_consistent(tensors: dict[str, torch.Tensor], meta: dict, parsed: SessionFields) -> None:
    """The cache, the transcript and the pins tell one story: every token run through the model is
    in the transcript (pending ones follow), every entry's token index is one of them, every pin
    lies inside the transcript. ValueError otherwise (a file edited, then re-checksummed)."""
    logical = meta["cache"]["logical_length"]
    if not isinstance(logical, int) or logical + len(parsed.pending) != len(parsed.transcript):
        raise ValueError(
            f"the cache has read {logical} tokens and {len(parsed.pending)} are pending, but the transcript "
            f"holds {len(parsed.transcript)}"
        )
    for name, t in tensors.items():
        if name.startswith("cache.layers.") and name.endswith(".tok") and t.numel():
            if int(t.min()) < 0 or int(t.max()) >= logical:
                raise ValueError(f"{name} holds token indices outside [0, {logical})")
    for a, b in parsed.pinned + [(x.start, x.end) for x in parsed.archive]:
        if not 0 <= a <= b <= len(parsed.transcript):
            raise ValueError(f"pinned range ({a}, {b}) lies outside the transcript (0, {len(parsed.transcript)})")


def parse_session(tensors: dict[str, torch.Tensor], meta: dict, vocab: int) -> SessionFields:
    """The session part of a file's state, validated (token ids within ``vocab``, the cache, the
    transcript and the pins consistent); ValueError / KeyError / TypeError otherwise."""
    fields = SessionFields(tensors, meta, vocab)
    _check_consistent(tensors, meta, fields)
    return fields


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
