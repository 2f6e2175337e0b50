"""Non-uniform per-head budgets: allocation math, profiles (validation, fallbacks), calibration."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from agentmem import AgentSession
from agentmem.calibrate import calibrate, shares_from_curves, write_profile
from agentmem.errors import ProfileError
from agentmem.policy.head_budgets import resolve_budgets, water_fill
from agentmem.policy.presets import available_presets
from agentmem.policy.profiles import HeadProfile, load_profile
from tests.helpers import TEXT


def test_water_fill_meets_total_caps_and_floors():
    caps = torch.tensor([10, 100, 100, 3])
    w = torch.tensor([1.0, 4.0, 0.0, 10.0])
    t = water_fill(caps, w, 60, floor=torch.tensor([2.0, 2.0, 2.0, 2.0]))
    assert sum(t) == 60
    assert all(0 <= x <= c for x, c in zip(t, caps.tolist()))
    assert t[3] == 3 and t[2] == 2  # capped head full; zero-weight head at its floor
    assert t[1] > t[0]
    assert water_fill(caps, w, 10_000) == caps.tolist()  # more than everything: all of it


def test_shares_follow_the_curves():
    # head 0 loses a lot when squeezed, head 1 nothing: head 0 must get the larger share
    ratios = [0.05, 0.25, 0.5, 1.0]
    curves = torch.tensor([[[0.5, -0.2, -0.3, -0.35], [0.0, 0.0, 0.0, 0.0]]], dtype=torch.float64)
    shares = shares_from_curves(curves, ratios, 0.1, [0.1, 0.25], max_share=0.9)
    assert abs(float(shares.sum()) - 1) < 1e-9
    assert shares[0, 0] > 0.6


def _profile(spec, shares) -> HeadProfile:
    layers = [i for i in range(spec.num_layers) if spec.sliding_window[i] is None]
    return HeadProfile(
        model=spec.name,
        config_hash=spec.config_hash,
        num_layers=spec.num_layers,
        num_kv_heads=spec.num_kv_heads,
        layers=layers,
        baseline=0.1,
        ratios=[0.5],
        curves=[[[0.0]] * spec.num_kv_heads for _ in layers],
        shares=shares,
        target_ratios=[0.25],
        max_share=1.0,
    )


def test_bad_profiles_are_rejected_and_fall_back_to_uniform(tiny_llama, tmp_path):
    _, loaded = tiny_llama
    spec = loaded.spec
    bad_json = tmp_path / "corrupt.json"
    bad_json.write_text("{not json")
    with pytest.raises(ProfileError, match="not valid JSON"):
        load_profile(bad_json)
    good = _profile(spec, [[1 / 6] * 2] * 3)
    path = tmp_path / "sum.json"
    path.write_text(json.dumps(good.model_dump() | {"shares": [[0.25, 0.25], [0.25, 0.25], [0.25, 0.0]]}))  # sum 1.25
    with pytest.raises(ProfileError, match="sum to 1"):
        load_profile(path)
    other = tmp_path / "other.json"
    other.write_text(_profile(spec, [[1 / 6] * 2] * 3).model_copy(update={"config_hash": "0" * 16}).model_dump_json())
    with pytest.warns(UserWarning, match="calibrated for"):
        mode, profile, desc = resolve_budgets("profile", str(other), spec)
    assert mode == "uniform" and profile is None and "rejected" in desc
    with pytest.warns(UserWarning, match="using uniform budgets"):
        s = AgentSession(
            model=loaded,
            max_kv_mb=None,
            policy={"name": "am-halve", "head_budgets": "profile", "offline_head_budgets": None, "profile": str(path)},
        )
    assert s.stats.head_budgets.startswith("uniform")
    s.append(TEXT * 3)
    s.compact(0.5)  # still works, uniformly
    assert len({n for layer in s.cache.layers for n in layer.lengths}) == 1


def test_profile_budgets_follow_shares_at_equal_total(tiny_llama, tmp_path):
    _, loaded = tiny_llama
    spec = loaded.spec
    path = tmp_path / "p.json"
    write_profile(_profile(spec, [[0.4, 0.1], [0.1, 0.1], [0.2, 0.1]]), path)
    uniform = AgentSession(model=loaded, max_kv_mb=None, policy="am-halve-uniform")
    uniform.append(TEXT * 6)
    prof = uniform.fork()
    prof.policy = {"name": "am-halve", "head_budgets": "profile", "offline_head_budgets": None, "profile": str(path)}
    assert prof.stats.head_budgets.startswith("profile")
    uniform.compact(0.25)
    ev = prof.compact(0.25)
    assert any("head budgets" in n for n in ev.notes)
    assert prof.cache.physical_entries == uniform.cache.physical_entries
    lengths = [layer.lengths for layer in prof.cache.layers]
    assert lengths[0][0] > lengths[0][1] and lengths[0][0] > lengths[1][0]
    assert prof.generate(" The", max_new_tokens=4).stats.generated_tokens == 4


def test_global_budgets_equal_total_and_uneven_heads(tiny):
    """Llama, Qwen 3 (q/k norms) and Gemma 3 (sliding-window layers left out of the allocation)."""
    _, loaded = tiny
    uniform = AgentSession(model=loaded, max_kv_mb=None, policy="am-halve-uniform")
    uniform.append(TEXT * 6)
    glob = uniform.fork()
    glob.policy = {"name": "am-halve", "head_budgets": "global"}
    uniform.compact(0.25)
    ev = glob.compact(0.25)
    assert "head budgets: global" in ev.notes
    assert glob.cache.physical_entries == uniform.cache.physical_entries
    assert len({n for layer in glob.cache.layers for n in layer.lengths}) > 1
    for a, b in zip(glob.cache.layers, uniform.cache.layers):
        if a.sliding_window is not None:
            assert a.lengths == b.lengths
    logits = glob.score(" The quick brown fox", return_logits=True).logits
    assert torch.isfinite(logits).all()
    assert glob.generate(" The", max_new_tokens=4).stats.generated_tokens == 4


def test_calibration_on_a_tiny_model_writes_a_valid_profile(tiny_llama, tmp_path):
    _, loaded = tiny_llama
    text = tmp_path / "calib.txt"
    text.write_text(TEXT * 12)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        profile = calibrate(
            texts=[str(text)],
            context=96,
            continuation=32,
            baseline=0.25,
            ratios=(0.1, 0.5, 1.0),
            targets=(0.25,),
            loaded=loaded,
            show_progress=False,
        )
    assert len(profile.curves) == loaded.spec.num_layers and len(profile.curves[0][0]) == 3
    assert all(torch.isfinite(torch.tensor(profile.curves)).flatten().tolist())
    path = write_profile(profile, tmp_path / "tiny.json")
    again = load_profile(path)
    assert again.shares == profile.shares
    mode, used, _ = resolve_budgets("auto", str(path), loaded.spec)
    assert mode == "profile" and used is not None


def test_presets_and_defaults(tiny_llama):
    assert {"am-halve-uniform", "am-halve-profile"} <= set(available_presets())
    _, loaded = tiny_llama
    s = AgentSession(model=loaded, max_kv_mb=None)
    assert s.policy.head_budgets == "uniform" and s.policy.offline_budgets == "global"


def test_online_profile_budgets_keep_generating_within_budget(tiny_llama, tmp_path):
    """A profile that favours one layer: online halvings stay in budget and do not thrash."""
    _, loaded = tiny_llama
    path = tmp_path / "skewed.json"
    write_profile(_profile(loaded.spec, [[0.45, 0.45], [0.025, 0.025], [0.025, 0.025]]), path)
    runs = {}
    for name, policy in {
        "profile": {"name": "am-halve", "recent": 16, "head_budgets": "profile", "profile": str(path)},
        "uniform": {"name": "am-halve", "recent": 16, "head_budgets": "uniform"},
    }.items():
        s = AgentSession(model=loaded, max_kv_mb=0.12, policy=policy)
        r = s.generate(TEXT, max_new_tokens=400, ignore_eos=True)
        assert r.stats.generated_tokens == 400
        assert s.stats.peak_kv_bytes <= s.stats.max_kv_bytes
        runs[name] = s
    layers = runs["profile"].cache.layers
    assert min(layers[0].lengths) > max(layers[1].lengths)  # the favoured layer kept more
    assert len(runs["profile"].compactions) <= 2 * len(runs["uniform"].compactions)


def test_config_hash_names_the_architecture_not_the_dtype(tokenizer):
    """Profiles and saved sessions match a model loaded in another dtype or by another transformers."""
    from agentmem.models import wrap_model
    from tests.helpers import build_tiny, twin

    ref = build_tiny("llama", len(tokenizer))
    low = twin(ref).to(torch.bfloat16)
    low.config.dtype = torch.bfloat16
    low.config.transformers_version = "0.0.0"
    a, b = wrap_model(twin(ref), tokenizer, name="a"), wrap_model(low, tokenizer, name="b")
    assert a.spec.config_hash == b.spec.config_hash
    wider = build_tiny("llama", len(tokenizer), hidden_size=96)
    assert wrap_model(twin(wider), tokenizer, name="c").spec.config_hash != a.spec.config_hash


def test_calibrate_command_takes_its_own_options(capsys):
    """`agentmem calibrate --model X` reaches calibrate's parser (argparse.REMAINDER used to drop it)."""
    from agentmem import cli

    with pytest.raises(SystemExit) as exc:
        cli.main(["calibrate", "--model", "smollm2-135m", "--help"])
    assert exc.value.code == 0 and "--max-share-factor" in capsys.readouterr().out
