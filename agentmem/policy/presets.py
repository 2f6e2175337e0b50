"""Policies by name: the built-in ones, the presets shipped in ``policies/`` and preset files.

Policies are selected by name (``resolve_policy("am-halve")``), from a preset file (JSON or TOML,
settings at the top level or under a ``policy`` key), or from a config object.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

from pydantic import BaseModel, ValidationError

from ..errors import UnknownPolicyError
from .config import CONFIG_ADAPTER
from .planner import Policy, SpanPolicy, WindowPolicy
from .profiles import policies_dir

_POLICIES: dict[str, type[Policy]] = {
    "streaming": WindowPolicy,
    "truncate": WindowPolicy,
    "am-halve": SpanPolicy,
    "h2o": SpanPolicy,
    "snapkv": SpanPolicy,
    "kvzip": SpanPolicy,
}


DEFAULT_POLICY = "am-halve"


def preset_dir() -> Path:
    """The policy presets shipped with agentmem (``policies/`` of the package data or source tree)."""
    return policies_dir()


def available_policies() -> list[str]:
    return sorted(_POLICIES)


def available_presets() -> list[str]:
    return sorted(p.stem for p in preset_dir().glob("*.toml"))


def policy_from_config(config: BaseModel | dict) -> Policy:
    if isinstance(config, dict):
        name = config.get("name")
        if name not in _POLICIES:
            raise UnknownPolicyError(f"unknown policy {name!r}; known policies: {', '.join(available_policies())}")
        try:
            config = CONFIG_ADAPTER.validate_python(config)
        except ValidationError as exc:
            raise UnknownPolicyError(f"invalid settings for policy {name!r}: {exc}") from exc
    name = getattr(config, "name", None)
    if name not in _POLICIES:
        raise UnknownPolicyError(f"unknown policy {name!r}; known policies: {', '.join(available_policies())}")
    return _POLICIES[name](config)


def resolve_policy(policy: str | Path | BaseModel | dict | Policy | None) -> Policy:
    """A policy from a name, a preset file (JSON/TOML), a config object or dict, or a Policy instance."""
    if policy is None:
        policy = DEFAULT_POLICY
    if isinstance(policy, Policy):
        return policy
    if isinstance(policy, (BaseModel, dict)):
        return policy_from_config(policy)
    text = str(policy)
    if text in _POLICIES:
        return policy_from_config({"name": text})
    path = Path(text)
    if not path.suffix and (preset_dir() / f"{text}.toml").is_file():  # a preset shipped with agentmem
        path = preset_dir() / f"{text}.toml"
    if path.suffix in (".json", ".toml"):
        if not path.is_file():
            raise UnknownPolicyError(f"policy preset {text!r} does not exist")
        raw = path.read_text()
        try:
            data = json.loads(raw) if path.suffix == ".json" else tomllib.loads(raw)
        except (json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
            raise UnknownPolicyError(f"policy preset {text!r} is not valid {path.suffix[1:].upper()}: {exc}") from exc
        return policy_from_config(data.get("policy", data))
    raise UnknownPolicyError(
        f"unknown policy {text!r}; known policies: {', '.join(available_policies())}; presets: "
        f"{', '.join(available_presets())} (or a .json/.toml file)"
    )
