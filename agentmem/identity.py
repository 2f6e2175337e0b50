"""Model identity: what a saved session or cartridge records about its model, and the check that a
loaded model is that model (config hash, and a few weights sampled evenly over the model)."""

from __future__ import annotations

import torch

from .errors import ModelMismatchError
from .models import LoadedModel

_FINGERPRINT_PARAMS = 6  # parameters sampled (evenly over the model) ...
_FINGERPRINT_VALUES = 16  # ... and values sampled (evenly over each parameter)


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
