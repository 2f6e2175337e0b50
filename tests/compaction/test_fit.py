"""Attention Matching math on synthetic tensors (no model)."""

from __future__ import annotations

import math

import pytest
import torch

from agentmem.compaction.fit import attention_match, block_scores, key_scores, span_key_scores

SCALE = 1 / math.sqrt(16)


def synthetic(b=3, n=48, T=40, d=16, seed=0, spread=2.0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, n, d, generator=g) * spread
    k = torch.randn(b, T, d, generator=g) * spread
    v = torch.randn(b, T, d, generator=g)
    return q, k, v


def compact_attention(q, res, k, scale=SCALE):
    """Output and mass of the compact block for queries q."""
    ck = torch.gather(k, 1, res.idx[..., None].expand(-1, -1, k.shape[-1]))
    s = block_scores(q, ck, scale, res.beta)
    return s, res.values


def errors(q, k, v, res, bias=None):
    s_full = block_scores(q, k, SCALE, bias)
    s_c, vc = compact_attention(q, res, k)
    # compare log-mass (relative to the same reference max) and output
    ref_max = s_full.amax(-1, keepdim=True)
    m_full = torch.exp(s_full - ref_max).sum(-1)
    m_c = torch.exp(s_c - ref_max).sum(-1)
    o_full = torch.softmax(s_full, -1) @ v
    o_c = torch.softmax(s_c, -1) @ vc
    return ((m_c - m_full).abs() / m_full).mean().item(), ((o_c - o_full).norm() / o_full.norm()).item()


@pytest.mark.parametrize("selection", ["highest", "omp"])
def test_keeping_every_key_is_exact(selection):
    q, k, v = synthetic()
    res = attention_match(q, k, v, t=k.shape[1], scale=SCALE, selection=selection, ridge=0.0)
    mass_err, out_err = errors(q, k, v, res)
    assert mass_err < 1e-4 and out_err < 1e-4
    assert res.beta.abs().max() < 1e-3
    torch.testing.assert_close(res.values, v, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("selection", ["highest", "omp"])
def test_errors_fall_as_t_grows(selection):
    q, k, v = synthetic(n=96, T=64)
    errs = []
    for t in (4, 8, 16, 32, 48):
        res = attention_match(q, k, v, t=t, scale=SCALE, selection=selection)
        errs.append(errors(q, k, v, res))
    mass = [e[0] for e in errs]
    out = [e[1] for e in errs]
    assert mass[-1] < mass[0] and out[-1] < out[0]
    assert out[-1] < 0.25 * out[0]


def test_fitted_beta_and_values_beat_plain_selection():
    q, k, v = synthetic(n=128, T=64, seed=3)
    fitted = attention_match(q, k, v, t=16, scale=SCALE)
    plain = attention_match(q, k, v, t=16, scale=SCALE, beta_bounds=(1.0, 1.0), fit_values_=False)
    assert torch.equal(fitted.idx, plain.idx)
    assert errors(q, k, v, fitted)[0] < errors(q, k, v, plain)[0]
    assert errors(q, k, v, fitted)[1] < errors(q, k, v, plain)[1]


def test_beta_stays_in_bounds():
    q, k, v = synthetic(n=64, T=64, spread=3.0)
    res = attention_match(q, k, v, t=8, scale=SCALE, beta_bounds=(0.5, 4.0))
    assert res.beta.min() >= math.log(0.5) - 1e-6 and res.beta.max() <= math.log(4.0) + 1e-6
    res = attention_match(q, k, v, t=8, scale=SCALE)  # default upper bound: the block size
    assert res.beta.max() <= math.log(64) + 1e-5 and res.beta.dtype == torch.float32


@pytest.mark.parametrize("selection", ["highest", "omp"])
def test_degenerate_inputs_give_finite_results(selection):
    q, k, v = synthetic(b=1, n=32, T=24)
    cases = {
        "duplicate keys": (q, k[:, :1].expand(-1, 24, -1).clone(), v),
        "single query": (q[:, :1], k, v),
        "huge logits": (q * 1e3, k * 1e3, v),
        "zero queries": (torch.zeros_like(q), k, v),
    }
    for name, (qq, kk, vv) in cases.items():
        for t in (1, 5):
            res = attention_match(qq, kk, vv, t=t, scale=SCALE, selection=selection)
            for tensor in (res.beta, res.values, res.output_error, res.mass_error):
                assert torch.isfinite(tensor).all(), (name, t)
            assert res.idx.shape == (1, t) and len(set(res.idx[0].tolist())) == t, name


def test_existing_bias_is_part_of_the_target():
    """A block that already carries beta (and padding) is matched including that beta."""
    q, k, v = synthetic(b=2, n=64, T=32)
    bias = torch.randn(2, 32) * 0.5
    bias[1, 28:] = float("-inf")  # padding of a shorter head
    res = attention_match(q, k, v, t=28, scale=SCALE, bias=bias, ridge=0.0)
    assert not set(res.idx[1].tolist()) & {28, 29, 30, 31}
    full = attention_match(q, k, v, t=28, scale=SCALE, bias=None, ridge=0.0)
    e_biased = errors(q, k, v, res, bias)
    e_unbiased_target = errors(q, k, v, full, bias)
    assert e_biased[1] < e_unbiased_target[1]


def test_too_few_keys_is_an_error():
    q, k, v = synthetic(b=1, T=8)
    bias = torch.zeros(1, 8)
    bias[0, 3:] = float("-inf")
    with pytest.raises(ValueError, match="fewer than the target"):
        attention_match(q, k, v, t=4, scale=SCALE, bias=bias)


def test_span_scores_match_one_softmax_over_the_span():
    """Chunked span-wide scores equal the scores of one softmax over all keys."""
    q, k, v = synthetic(b=2, n=16, T=40)
    bias = torch.randn(2, 40)
    bias[1, 35:] = float("-inf")
    s = block_scores(q, k, SCALE, bias)
    want = key_scores(torch.softmax(s, -1), "rms").masked_fill(~torch.isfinite(bias), -1.0)
    for reduce in ("rms", "max", "mean"):
        got = span_key_scores(q, k, SCALE, bias, reduce, chunk=7)
        ref = key_scores(torch.softmax(s, -1), reduce).masked_fill(~torch.isfinite(bias), -1.0)
        torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(span_key_scores(q, k, SCALE, bias, "rms", chunk=40), want, atol=1e-6, rtol=1e-5)
