"""Head profiles: per-head budget shares calibrated offline (``agentmem calibrate``), as JSON files.

A profile is data: ``policies/profiles/<model>.json``, matched to a model by its config hash. The
allocation that uses it lives in :mod:`agentmem.policy.head_budgets`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ..errors import ProfileError
from ..spec import ModelSpec

PROFILE_FORMAT = "agentmem-head-profile/1"
_SHARE_TOL = 1e-3


def policies_dir() -> Path:
    """The presets and profiles shipped with agentmem (``policies/``, package data or source tree)."""
    package = Path(__file__).resolve().parents[1]
    inside = package / "policies"
    return inside if inside.is_dir() else package.parent / "policies"


def profiles_dir() -> Path:
    return policies_dir() / "profiles"


class HeadProfile(BaseModel):
    """A calibrated per-head budget profile (a JSON file written by ``agentmem calibrate``).

    ``curves[i][h][j]``: change of the continuation's mean NLL (nats/token) when KV head h of layer
    ``layers[i]`` keeps ``ratios[j]`` of its entries while every other head keeps ``baseline``.
    ``shares[i][h]``: that head's share of the total budget (all shares sum to 1).
    """

    model_config = ConfigDict(extra="forbid")

    format: Literal["agentmem-head-profile/1"] = PROFILE_FORMAT
    model: str
    config_hash: str
    num_layers: int = Field(ge=1)
    num_kv_heads: int = Field(ge=1)
    layers: list[int] = Field(description="layers the shares cover (global-attention layers)")
    baseline: float = Field(gt=0, le=1)
    ratios: list[float]
    curves: list[list[list[float]]]
    shares: list[list[float]]
    target_ratios: list[float]
    max_share: float = Field(gt=0, le=1)
    calibration: dict = Field(default_factory=dict, description="texts, context, continuation, seconds, ...")

    @model_validator(mode="after")
    def _consistent(self) -> HeadProfile:
        n = len(self.layers)
        if any(not 0 <= layer < self.num_layers for layer in self.layers) or len(set(self.layers)) != n:
            raise ValueError(f"layers must be distinct indices in [0, {self.num_layers})")
        for name, rows, width in (("shares", self.shares, None), ("curves", self.curves, len(self.ratios))):
            if len(rows) != n or any(len(row) != self.num_kv_heads for row in rows):
                raise ValueError(f"{name} must be {n} layers x {self.num_kv_heads} KV heads")
            if width is not None and any(len(c) != width for row in rows for c in row):
                raise ValueError(f"every curve must have one value per ratio ({width})")
        flat = [s for row in self.shares for s in row]
        if any(not math.isfinite(s) or s < 0 for s in flat):
            raise ValueError("shares must be finite and >= 0")
        if abs(sum(flat) - 1.0) > _SHARE_TOL:
            raise ValueError(f"shares must sum to 1 (they sum to {sum(flat):.6f})")
        return self

    def weights(self) -> dict[tuple[int, int], float]:
        """(layer, head) -> share."""
        return {(layer, h): s for layer, row in zip(self.layers, self.shares) for h, s in enumerate(row)}


def load_profile(path: str | Path) -> HeadProfile:
    """Read and validate a profile file; raises :class:`ProfileError` saying what is wrong."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ProfileError(f"head profile {path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ProfileError(f"head profile {path} is not valid JSON ({exc}); re-run `agentmem calibrate`") from exc
    try:
        return HeadProfile.model_validate(data)
    except ValidationError as exc:
        raise ProfileError(f"head profile {path} is invalid: {exc}") from exc


def check_profile(profile: HeadProfile, spec: ModelSpec, path: str | Path = "profile") -> None:
    if profile.config_hash != spec.config_hash or profile.num_layers != spec.num_layers:
        raise ProfileError(
            f"head profile {path} was calibrated for {profile.model!r} (config {profile.config_hash}), "
            f"not for {spec.name!r} (config {spec.config_hash}); calibrate this model with `agentmem calibrate`"
        )
    if profile.num_kv_heads != spec.num_kv_heads:
        raise ProfileError(f"head profile {path} has {profile.num_kv_heads} KV heads, the model {spec.num_kv_heads}")


def find_profile(spec: ModelSpec) -> Path | None:
    """The shipped profile whose config hash matches the model, if any."""
    for path in sorted(profiles_dir().glob("*.json")):
        try:
            head = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            continue
        if isinstance(head, dict) and head.get("config_hash") == spec.config_hash:
            return path
    return None
