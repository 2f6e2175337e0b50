"""Attention Matching, as plain tensor functions.

Zweiger et al., "Fast KV Compaction via Attention Matching" (arXiv 2602.16284). A block of keys and
values ``K, V (T, d)`` of one KV head is replaced by ``t < T`` compact keys ``C_k``, a per-key bias
``beta`` and values ``C_v``, so that for reference queries ``Q (n, d)`` the compact block
reproduces both the attention *output* and the attention *mass* of the original block:

    S = s Q K^T + b          (b: bias the block already carries, -inf on padding)
    E = exp(S - rowmax S)    m = E 1      O = E V / m          (mass and output of the block)
    C_k = K[idx]             w = argmin_{lo <= w <= hi} |E[:, idx] w - m|^2,   beta = log w
    P = softmax(s Q C_k^T + beta)          C_v = argmin |P C_v - O|^2 + lam |C_v - V[idx]|^2

Matching mass and output per block is what makes blocks composable: attention over the whole
cache is a mass-weighted mixture of the blocks' outputs, so a block that keeps both leaves the
rest of the cache's attention unchanged.

Every function is batched over a leading dim B (one row per (layer, head, chunk)); shorter blocks
are padded with b = -inf. Fits run in fp32/fp64; beta is fp32; nothing non-finite is returned.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

NEG_INF = float("-inf")


def block_scores(q: torch.Tensor, k: torch.Tensor, scale: float, bias: torch.Tensor | None = None) -> torch.Tensor:
    """q (B, n, d), k (B, T, d), bias (B, T) -> logits S (B, n, T) in fp32."""
    s = torch.matmul(q.float(), k.float().transpose(1, 2)) * scale
    if bias is not None:
        s = s + bias.float()[:, None, :]
    return s


def mass_and_output(s: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """S (B, n, T), v (B, T, d) -> E (B, n, T) = exp(S - rowmax), m (B, n) = E 1, O (B, n, d) = E v / m."""
    e = torch.exp(s - s.amax(dim=-1, keepdim=True))
    m = e.sum(dim=-1)
    o = torch.matmul(e, v.float()) / m[..., None]
    return e, m, o


def select_highest_attention(s: torch.Tensor, t: int) -> torch.Tensor:
    """Top-t keys by the RMS over queries of their softmax weight. S (B, n, T) -> idx (B, t), ascending."""
    w = torch.softmax(s, dim=-1)
    score = w.pow(2).mean(dim=1).sqrt()  # (B, T); padded keys score 0
    score = torch.where(torch.isfinite(s[:, 0, :]), score, torch.full_like(score, -1.0))
    idx = torch.topk(score, t, dim=-1).indices
    return torch.sort(idx, dim=-1).values


def _gather_cols(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x (B, n, T), idx (B, t) -> (B, n, t)."""
    return torch.gather(x, 2, idx[:, None, :].expand(-1, x.shape[1], -1))


def _gather_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x (B, T, d), idx (B, t) -> (B, t, d)."""
    return torch.gather(x, 1, idx[..., None].expand(-1, -1, x.shape[-1]))


def fit_mass(e_sel: torch.Tensor, m: torch.Tensor, lo: float, hi: torch.Tensor | float, iters: int = 8) -> torch.Tensor:
    """Bounded least squares  min_{lo <= w <= hi} |E_sel w - m|^2.  E_sel (B, n, t), m (B, n) -> w (B, t).

    Normal equations in fp64 (jittered), clamped to the box, then projected-gradient steps with
    step 1/L, L the largest eigenvalue of E_sel^T E_sel (power iteration).
    """
    a = e_sel.double()
    gram = a.transpose(1, 2) @ a  # (B, t, t)
    rhs = (a.transpose(1, 2) @ m.double()[..., None]).squeeze(-1)  # (B, t)
    t = gram.shape[-1]
    jitter = 1e-9 * gram.diagonal(dim1=1, dim2=2).mean(dim=-1).clamp_min(1e-30)
    eye = torch.eye(t, dtype=gram.dtype, device=gram.device)
    w = torch.linalg.solve(gram + jitter[:, None, None] * eye, rhs)
    w = torch.nan_to_num(w, nan=1.0, posinf=1.0, neginf=1.0)
    hi_t = torch.as_tensor(hi, dtype=w.dtype, device=w.device)
    if hi_t.dim() == 1:
        hi_t = hi_t[:, None]
    w = torch.minimum(w.clamp_min(lo), hi_t)
    if iters > 0:
        x = torch.ones_like(rhs)[..., None]
        for _ in range(12):
            x = gram @ x
            x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-30)
        lip = (x.transpose(1, 2) @ gram @ x).squeeze(-1).squeeze(-1).clamp_min(1e-30)  # (B,)
        for _ in range(iters):
            grad = (gram @ w[..., None]).squeeze(-1) - rhs
            w = torch.minimum((w - grad / lip[:, None]).clamp_min(lo), hi_t)
    return w.float()


def fit_values(
    p: torch.Tensor, o: torch.Tensor, prior: torch.Tensor, ridge: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """min_C |P C - O|^2 + lam |C - prior|^2, lam = ridge * mean eigenvalue of P^T P.

    P (B, n, t), O (B, n, d), prior (B, t, d) (the copied values V[idx]) -> (C_v (B, t, d) fp32,
    ok (B,) bool). Solved in fp64 in the primal (t x t) or dual (n x n) form, whichever is smaller.
    Rows whose solution is not finite, or whose norm explodes, get the prior and ok = False.
    """
    p64, o64, v0 = p.double(), o.double(), prior.double()
    resid = o64 - p64 @ v0  # (B, n, d)
    n, t = p64.shape[1], p64.shape[2]
    fro = p64.pow(2).sum(dim=(1, 2))  # trace(P^T P)
    lam = (ridge * fro / t).clamp_min(1e-12 * fro.clamp_min(1e-30))[:, None, None]
    if t <= n:
        gram = p64.transpose(1, 2) @ p64 + lam * torch.eye(t, dtype=p64.dtype, device=p64.device)
        delta = torch.linalg.solve(gram, p64.transpose(1, 2) @ resid)
    else:
        gram = p64 @ p64.transpose(1, 2) + lam * torch.eye(n, dtype=p64.dtype, device=p64.device)
        delta = p64.transpose(1, 2) @ torch.linalg.solve(gram, resid)
    c = v0 + delta
    scale = prior.abs().amax(dim=(1, 2)).double().clamp_min(1e-6)
    ok = torch.isfinite(c).all(dim=(1, 2)) & (c.abs().amax(dim=(1, 2)) <= 1e3 * scale)
    c = torch.where(ok[:, None, None], c, v0)
    return c.float(), ok


def select_omp(
    e: torch.Tensor,
    m: torch.Tensor,
    t: int,
    valid: torch.Tensor,
    step: int = 1,
    lo: float = 1e-4,
    hi: torch.Tensor | float = 1e4,
    reselect: bool = True,
) -> torch.Tensor:
    """Orthogonal matching pursuit on the mass: greedily add the key whose column of E best explains
    the residual m - E[:, idx] w, refitting w after every ``step`` keys (step > 1 is the fast
    variant). With ``reselect``, keys whose weight ends at the floor ``lo`` are banned and their
    slots refilled one key at a time.

    E (B, n, T), m (B, n), valid (B, T) bool -> idx (B, t) ascending.
    """
    norms = e.norm(dim=1).clamp_min(1e-12)  # (B, T)
    banned = ~valid

    def best_keys(idx: torch.Tensor, w: torch.Tensor, live: torch.Tensor, k: int) -> torch.Tensor:
        e_sel = _gather_cols(e, idx) * live[:, None, :]
        resid = m - (e_sel @ w[..., None]).squeeze(-1)
        corr = (e * resid[..., None]).sum(dim=1) / norms
        taken = banned | torch.zeros_like(banned).scatter_(1, idx, live)
        return torch.topk(corr.masked_fill(taken, NEG_INF), k, dim=-1).indices

    bsz = e.shape[0]
    idx = torch.zeros(bsz, 0, dtype=torch.long, device=e.device)
    w = torch.zeros(bsz, 0, device=e.device)
    while idx.shape[1] < t:
        live = torch.ones_like(idx, dtype=torch.bool)
        idx = torch.cat([idx, best_keys(idx, w, live, min(step, t - idx.shape[1]))], dim=1)
        w = fit_mass(_gather_cols(e, idx), m, lo, hi, iters=0)
    if reselect:
        free = w <= lo * 1.0001  # (B, t) slots whose key carries no mass
        banned = banned | torch.zeros_like(banned).scatter_(1, idx, free)
        free &= (~banned).sum(dim=1, keepdim=True) >= t  # rows with too few candidates keep theirs
        for _ in range(t):
            rows = free.any(dim=1)
            if not rows.any():
                break
            live = ~free
            w = fit_mass(_gather_cols(e, idx) * live[:, None, :], m, lo, hi, iters=0)
            best = best_keys(idx, w, live, 1)[:, 0]
            slot = free.float().argmax(dim=1)
            r = rows.nonzero().squeeze(1)
            idx[r, slot[r]] = best[r]
            free[r, slot[r]] = False
    return torch.sort(idx, dim=-1).values


@dataclass
class Compacted:
    """Result for B blocks: idx (B, t), beta (B, t) fp32, values (B, t, d) fp32, and diagnostics."""

    idx: torch.Tensor
    beta: torch.Tensor
    values: torch.Tensor
    values_ok: torch.Tensor  # (B,) False where the value fit fell back to copied values
    output_error: torch.Tensor  # (B,) |P C_v - O| / |O| on the fitting queries
    mass_error: torch.Tensor  # (B,) RMS over queries of the relative mass error


def attention_match(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    t: int,
    scale: float,
    bias: torch.Tensor | None = None,
    selection: str = "highest",
    omp_step: int = 1,
    beta_bounds: tuple[float, float | None] = (1e-4, None),
    beta_iters: int = 8,
    ridge: float = 1e-3,
    fit_values_: bool = True,
) -> Compacted:
    """Compact B blocks to t entries each.

    q (B, n, d) reference queries; k, v (B, T, d) the block; bias (B, T) fp32 the beta the block
    already carries (-inf on padding, which is never selected; every row needs >= t valid keys).
    ``selection``: "highest" (RMS attention) or "omp". ``beta_bounds``: bounds on w = exp(beta);
    the upper bound None means the block's size T (one key can stand for at most all of them).
    """
    s = block_scores(q, k, scale, bias)  # (B, n, T)
    valid = torch.isfinite(s[:, 0, :]) if bias is not None else torch.ones_like(s[:, 0, :], dtype=torch.bool)
    n_valid = valid.sum(dim=-1)
    if int(n_valid.min().item()) < t:
        raise ValueError(f"a block has {int(n_valid.min().item())} keys, fewer than the target {t}")
    e, m, o = mass_and_output(s, v)
    lo = beta_bounds[0]
    hi = n_valid.double() if beta_bounds[1] is None else beta_bounds[1]
    if selection == "highest":
        idx = select_highest_attention(s, t)
    elif selection == "omp":
        rel = e / m[..., None]
        idx = select_omp(rel, torch.ones_like(m), t, valid, step=omp_step, lo=lo, hi=hi)
    else:
        raise ValueError(f"unknown key selection {selection!r}: use 'highest' or 'omp'")
    e_sel = _gather_cols(e, idx)
    # relative residuals: every query's mass matters in proportion, not only the heaviest ones
    w = fit_mass(e_sel / m[..., None], torch.ones_like(m), lo, hi, iters=beta_iters)
    beta = torch.log(w)
    mass_err = ((e_sel @ w[..., None]).squeeze(-1) / m - 1).norm(dim=-1) / m.shape[-1] ** 0.5
    ck = _gather_rows(k, idx)
    prior = _gather_rows(v, idx).float()
    p = torch.softmax(block_scores(q, ck, scale, beta), dim=-1)  # (B, n, t)
    if fit_values_:
        cv, ok = fit_values(p, o, prior, ridge)
    else:
        cv, ok = prior, torch.ones(idx.shape[0], dtype=torch.bool, device=idx.device)
    out_err = (p @ cv).sub(o).norm(dim=(1, 2)) / o.norm(dim=(1, 2)).clamp_min(1e-12)
    return Compacted(idx=idx, beta=beta, values=cv, values_ok=ok, output_error=out_err, mass_error=mass_err)
