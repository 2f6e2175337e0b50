"""Attention Matching math on synthetic tensors (no model)."""

from __future__ import annotations

import math

import pytest
import torch

from agentmem.compaction.fit import attention_match, block_scores, key_scores
from agentmem.compaction.scores import CPU_BLOCK_BYTES, block_bytes, head_pass

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


def test_one_pass_scores_match_softmaxes_over_the_head_and_over_each_span():
    """head_pass, a few queries at a time over whole heads (batched), gives each span's ranking as
    one softmax over that span alone, each query's share per chunk, and the full-softmax max
    weights; a span whose weights underflow in the full softmax still gets its own softmax."""
    q, k, _ = synthetic(b=2, n=16, T=40)
    beta = torch.randn(2, 40)
    beta[:, 37:] = float("-inf")
    beta[0, 30:34] = -200.0  # far below the rest: their full-softmax weights underflow to 0
    s = block_scores(q, k, SCALE, beta)  # (2, n, T)
    spans = [(2, 20, [2, 9, 20]), (25, 40, [25, 40]), (30, 34, [30, 34])]
    for reduce in ("rms", "max", "mean"):
        entry, ranked = head_pass(k, beta, q, SCALE, "max", spans, reduce, work_bytes=2 * 3 * 4 * 40)  # 3 a block
        torch.testing.assert_close(entry, torch.softmax(s, -1).amax(1))
        for b in range(2):
            for (start, end, edges), got in zip(spans, ranked[b]):
                w = torch.softmax(s[b, :, start:end], -1)
                want = key_scores(w[None], reduce)[0].masked_fill(~torch.isfinite(beta[b, start:end]), -1.0)
                torch.testing.assert_close(got.keys, want, atol=1e-6, rtol=1e-5)
                shares = torch.stack([w[:, a - start : e - start].sum(-1) for a, e in zip(edges, edges[1:])])
                torch.testing.assert_close(got.shares, shares, atol=1e-6, rtol=1e-5)
    total, _ = head_pass(k, beta, q, SCALE, "sum", work_bytes=2 * 5 * 4 * 40)
    torch.testing.assert_close(total, torch.softmax(s, -1).sum(1))


def test_one_pass_scores_without_masked_entries_and_a_head_with_none_visible():
    """With every beta finite (no row can be empty) the pass skips its NaN clean-up and still gives
    the full softmax; a head whose entries are all masked gives zero weight, never NaN. On a CPU
    the blocks are capped at the L2-sized CPU_BLOCK_BYTES whatever memory the caller allows."""
    q, k, _ = synthetic(b=2, n=16, T=40)
    beta = torch.randn(2, 40)
    s = block_scores(q, k, SCALE, beta)
    entry, _ = head_pass(k, beta, q, SCALE, "sum", work_bytes=2 * 5 * 4 * 40)
    torch.testing.assert_close(entry, torch.softmax(s, -1).sum(1))
    beta[1] = float("-inf")
    entry, ranked = head_pass(k, beta, q, SCALE, "max", [(0, 40, [0, 20, 40])], work_bytes=2 * 5 * 4 * 40)
    torch.testing.assert_close(entry[0], torch.softmax(s[0], -1).amax(0))
    assert torch.equal(entry[1], torch.zeros(40)) and torch.isfinite(ranked[1][0].shares).all()
    assert block_bytes(torch.device("cpu"), 64 * CPU_BLOCK_BYTES) == CPU_BLOCK_BYTES
    assert block_bytes(torch.device("cpu"), 1000) == 1000
    assert block_bytes(torch.device("cuda"), 64 * CPU_BLOCK_BYTES) == 64 * CPU_BLOCK_BYTES


def test_a_padded_selection_fits_as_it_would_alone():
    """A block's fit does not depend on its batch: padding its selection to a batch-mate's longer
    one (masked entries) gives the same beta and values as fitting it alone."""
    q, k, v = synthetic(b=2, n=32, T=40)
    idx = torch.stack([torch.arange(0, 40, 4), torch.arange(0, 40, 2)[:10]])  # targets 10 and 10
    alone = attention_match(q[:1], k[:1], v[:1], 6, SCALE, idx=idx[:1, :6], ridge=1.0, beta_ridge=1e-2)
    padded_idx = torch.stack([torch.cat([idx[0, :6], torch.zeros(4, dtype=torch.long)]), idx[1]])
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[0, 6:] = False
    both = attention_match(q, k, v, 10, SCALE, idx=padded_idx, idx_mask=mask, ridge=1.0, beta_ridge=1e-2)
    torch.testing.assert_close(both.beta[0, :6], alone.beta[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(both.values[0, :6], alone.values[0], atol=1e-5, rtol=1e-5)
