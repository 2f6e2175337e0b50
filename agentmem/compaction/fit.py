"""Attention Matching, as plain tensor functions.

Zweiger et al., "Fast KV Compaction via Attention Matching" (arXiv 2602.16284). A block of keys and
values ``K, V (T, d)`` of one KV head is replaced by ``t < T`` compact keys ``C_k``, a per-key bias
``beta`` and values ``C_v``, so that for reference queries ``Q (n, d)`` the compact block
reproduces both the attention *output* and the attention *mass* of the original block:

    S = s Q K^T + b          (b: bias the block already carries, -inf on padding)
    E = exp(S - rowmax S)    m = E 1      O = E V / m          (mass and output of the block)
    C_k = K[idx]             w = argmin_{lo <= w <= hi} |(E[:, idx] w - m) / m|^2,   beta = log w
    P = softmax(s Q C_k^T + beta)          C_v = argmin |P C_v - O|^2 + lam |C_v - V[idx]|^2

The mass is matched in relative terms (each query's residual divided by its own mass m), i.e. on
the block's softmax weights E / m: the heaviest queries do not drown the others.

Matching mass and output per block is what makes blocks composable: attention over the whole
cache is a mass-weighted mixture of the blocks' outputs, so a block that keeps both leaves the
rest of the cache's attention unchanged.

Every function is batched over a leading dim B (one row per (layer, head, chunk)); shorter blocks
are padded with b = -inf. Fits run in fp32 (a system that fails is solved again in fp64); beta is
fp32; nothing non-finite is returned.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

NEG_INF = float("-inf")


def block_scores(q: torch.Tensor, k: torch.Tensor, scale: float, bias: torch.Tensor | None = None) -> torch.Tensor:
    """q (B, n, d), k (B, T, d), bias (B, T) -> logits S (B, n, T) in fp32."""
    if q.dtype == torch.bfloat16:  # bf16 inputs (fast ranking): bf16 products, fp32 out
        s = torch.bmm(q, k.transpose(1, 2)).float().mul_(scale)
        return s if bias is None else s.add_(bias.float()[:, None, :])
    q, kt = q.float(), k.float().transpose(1, 2)
    if bias is None:
        return torch.bmm(q, kt).mul_(scale)
    return torch.baddbmm(bias.float()[:, None, :].expand(-1, q.shape[1], -1), q, kt, alpha=scale)


def key_scores(w: torch.Tensor, reduce: str, inplace: bool = False) -> torch.Tensor:
    """Reduce softmax weights W (B, n, T) over queries to one score per key (B, T).

    ``inplace`` lets the RMS square W in place (W is garbage afterwards; saves an n x T buffer).
    """
    if reduce == "rms":
        sq = w.square_() if inplace else w * w
        return sq.sum(dim=1).div_(w.shape[1]).sqrt_()
    if reduce == "max":
        return w.amax(dim=1)
    if reduce == "mean":
        return w.mean(dim=1)
    raise ValueError(f"unknown score reduction {reduce!r}: use 'rms', 'max' or 'mean'")


def _gather_cols(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x (B, n, T), idx (B, t) -> (B, n, t)."""
    return torch.gather(x, 2, idx[:, None, :].expand(-1, x.shape[1], -1))


def _gather_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x (B, T, d), idx (B, t) -> (B, t, d)."""
    return torch.gather(x, 1, idx[..., None].expand(-1, -1, x.shape[-1]))


def spd_solve(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Solve a x = b for symmetric positive definite a (B, t, t), b (B, t, k) -> (x, ok (B,) bool).

    Cholesky, not LU: the systems here are ridge-regularised normal equations, and MKL's pivoted LU
    was seen to fail on well-conditioned batches inside pytest on a 2-core machine. Solved in the
    dtype of ``a`` (fp32: the ridge bounds the condition number); a system whose factorisation
    fails or whose solution is not finite is solved again in fp64, and if that fails too it gets
    x = 0 and ok = False. x has the dtype of ``a``.
    """
    x, ok = _cholesky(a, b)
    retry = ~ok | ~torch.isfinite(x).all(dim=(1, 2))
    if a.dtype != torch.float64 and bool(retry.any()):
        x64, ok64 = _cholesky(a[retry].double(), b[retry].double())
        x[retry], ok[retry] = x64.to(x.dtype), ok64 & torch.isfinite(x64).all(dim=(1, 2))
    return x, ok


def _cholesky(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    chol, info = torch.linalg.cholesky_ex(a)
    ok = info == 0
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device).expand_as(a)
    x = torch.cholesky_solve(b, torch.where(ok[:, None, None], chol, eye))
    return torch.where(ok[:, None, None], x, torch.zeros_like(x)), ok


def fit_mass(
    e_sel: torch.Tensor,
    m: torch.Tensor,
    lo: float,
    hi: torch.Tensor | float,
    iters: int = 100,
    ridge: float = 1e-4,
    count: torch.Tensor | None = None,
) -> torch.Tensor:
    """Bounded least squares  min_{lo <= w <= hi} |E_sel w - m|^2 + lam |w - c|^2.

    E_sel (B, n, t), m (B, n) -> w (B, t) fp32. ``c`` is the best single common weight (what every
    kept key would carry if they were interchangeable) and lam = ridge * mean eigenvalue: a light
    pull that keeps ill-conditioned problems well-posed; ``count`` (B,): the real columns of a
    zero-padded E_sel (the mean is over those, so a block's fit does not depend on its batch).
    Normal equations in fp32 (:func:`spd_solve` retries a failed system in fp64), clamped to the
    box, then ``iters`` steps of accelerated projected gradient (FISTA, step 1/L with L the
    largest eigenvalue from a power iteration).
    """
    a = e_sel.float()
    gram = a.transpose(1, 2) @ a  # (B, t, t); entries of E are in [0, 1]: fp32 is enough (ridged)
    rhs = (a.transpose(1, 2) @ m.float()[..., None]).squeeze(-1)  # (B, t)
    t = gram.shape[-1]
    row = a.sum(dim=-1)  # (B, n) = E_sel 1
    c = (row * m.float()).sum(-1) / (row * row).sum(-1).clamp_min(1e-30)  # (B,)
    real = t if count is None else count.float().clamp_min(1)
    lam = ridge * (gram.diagonal(dim1=1, dim2=2).sum(dim=-1) / real).clamp_min(1e-30)  # (B,)
    eye = torch.eye(t, dtype=gram.dtype, device=gram.device)
    gram = gram + lam[:, None, None] * eye
    rhs = rhs + (lam * c)[:, None]
    w, _ = spd_solve(gram, rhs[..., None])
    w = torch.nan_to_num(w.squeeze(-1), nan=1.0, posinf=1.0, neginf=1.0)
    hi_t = torch.as_tensor(hi, dtype=w.dtype, device=w.device)
    if hi_t.dim() == 1:
        hi_t = hi_t[:, None]
    w = torch.minimum(w.clamp_min(lo), hi_t)
    if iters > 0:
        x = torch.ones_like(rhs)[..., None]
        for _ in range(12):
            x = gram @ x
            x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-30)
        lip = (x.transpose(1, 2) @ gram @ x).squeeze(-1).squeeze(-1).clamp_min(1e-30)[:, None]  # (B, 1)
        y, w_prev, mom = w, w, 1.0
        for _ in range(iters):
            grad = (gram @ y[..., None]).squeeze(-1) - rhs
            w_next = torch.minimum((y - grad / lip).clamp_min(lo), hi_t)
            mom_next = (1 + (1 + 4 * mom * mom) ** 0.5) / 2
            y = w_next + ((mom - 1) / mom_next) * (w_next - w_prev)
            w_prev, mom = w_next, mom_next
        w = w_prev
    return w.float()


def fit_values(
    p: torch.Tensor, o: torch.Tensor, prior: torch.Tensor, ridge: float, count: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """min_C |P C - O|^2 + lam |C - prior|^2, lam = ridge * mean eigenvalue of P^T P (over the
    ``count`` (B,) real columns of a zero-padded P).

    P (B, n, t), O (B, n, d), prior (B, t, d) (the copied values V[idx]) -> (C_v (B, t, d) fp32,
    ok (B,) bool). Solved in the primal (t x t) or dual (n x n) form, whichever is smaller, in fp32
    (:func:`spd_solve` retries a failed system in fp64).
    Rows whose solution is not finite, or whose norm explodes, get the prior and ok = False.
    """
    p32, v0 = p.float(), prior.float()
    resid = o.float() - p32 @ v0  # (B, n, d)
    n, t = p32.shape[1], p32.shape[2]
    # fp32: P is a softmax (in [0, 1]) and the ridge bounds the condition number by ~t / ridge
    if t <= n:
        gram = p32.transpose(1, 2) @ p32
        rhs = p32.transpose(1, 2) @ resid
    else:
        gram = p32 @ p32.transpose(1, 2)
        rhs = resid
    fro = gram.diagonal(dim1=1, dim2=2).sum(dim=-1)  # trace(P^T P) = trace(P P^T)
    real = t if count is None else count.float().clamp_min(1)
    lam = (ridge * fro / real).clamp_min(1e-12 * fro.clamp_min(1e-30))[:, None, None]
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    # a non-finite system (e.g. a query whose softmax had no finite logit) must not reach LAPACK
    finite = torch.isfinite(gram).all(dim=(1, 2)) & torch.isfinite(rhs).all(dim=(1, 2)) & torch.isfinite(lam[:, 0, 0])
    a = torch.where(finite[:, None, None], gram + lam * eye, eye.expand_as(gram))
    b = torch.where(finite[:, None, None], rhs, torch.zeros_like(rhs))
    sol, solved = spd_solve(a, b)
    delta = sol if t <= n else torch.nan_to_num(p32).transpose(1, 2) @ sol
    c = v0 + delta
    scale = prior.abs().amax(dim=(1, 2)).clamp_min(1e-6)
    ok = finite & solved & torch.isfinite(c).all(dim=(1, 2)) & (c.abs().amax(dim=(1, 2)) <= 1e3 * scale)
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


REDUCTIONS = {"highest": "rms", "highest-max": "max", "highest-mean": "mean"}


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
    beta_iters: int = 5,
    ridge: float = 1e-3,
    beta_ridge: float = 1e-4,
    fit_beta: bool = True,
    fit_values_: bool = True,
    idx: torch.Tensor | None = None,
    idx_mask: torch.Tensor | None = None,
) -> Compacted:
    """Compact B blocks to t entries each.

    q (B, n, d) reference queries; k, v (B, T, d) the block; bias (B, T) fp32 the beta the block
    already carries (-inf on padding, which is never selected; every row needs >= t valid keys).
    ``selection``: "highest" (RMS attention; "highest-max" / "highest-mean" reduce by max / mean)
    or "omp"; ``idx`` (B, t) skips selection and fits the given keys; ``idx_mask`` (B, t) marks the real entries
    of a padded ``idx`` (the others get zero values and must be dropped by the caller). ``beta_bounds``: bounds on
    w = exp(beta); the upper bound None means the block's size T (one key can stand for all).
    """
    s = block_scores(q, k, scale, bias)  # (B, n, T), old beta included
    valid = torch.isfinite(s[:, 0, :]) if bias is not None else torch.ones_like(s[:, 0, :], dtype=torch.bool)
    n_valid = valid.sum(dim=-1)
    if int(n_valid.min().item()) < t:
        raise ValueError(f"a block has {int(n_valid.min().item())} keys, fewer than the target {t}")
    # rel = E / m: each query's attention over the block, normalised to its own mass; the beta fit
    # works on these relative weights so every query's mass matters, not only the heaviest ones
    rel = torch.softmax(s, dim=-1)  # (B, n, T)
    o = rel @ v.float()  # (B, n, d) the block's attention output
    lo = beta_bounds[0]
    hi = n_valid.double() if beta_bounds[1] is None else beta_bounds[1]
    if idx is not None:
        if idx.shape != (s.shape[0], t):
            raise ValueError(f"given idx has shape {tuple(idx.shape)}, expected {(s.shape[0], t)}")
    elif selection in REDUCTIONS:
        idx = torch.sort(torch.topk(key_scores(rel, REDUCTIONS[selection]).masked_fill(~valid, -1.0), t).indices).values
    elif selection == "omp":
        idx = select_omp(rel, torch.ones_like(rel[..., 0]), t, valid, step=omp_step, lo=lo, hi=hi)
    else:
        raise ValueError(f"unknown key selection {selection!r}: use 'highest', 'highest-max', 'highest-mean' or 'omp'")
    rel_sel = _gather_cols(rel, idx)  # (B, n, t)
    if idx_mask is not None:  # padded selections (rows of a batch keep different numbers of keys)
        rel_sel = rel_sel * idx_mask[:, None, :]
    ones = torch.ones_like(rel[..., 0])
    count = None if idx_mask is None else idx_mask.sum(dim=-1)  # (B,) real entries of a padded selection
    if fit_beta:
        w = fit_mass(rel_sel, ones, lo, hi, iters=beta_iters, ridge=beta_ridge, count=count)
    else:
        w = torch.ones(idx.shape, dtype=torch.float32, device=idx.device)
    beta = torch.log(w)
    mass_err = ((rel_sel @ w[..., None]).squeeze(-1) - 1).norm(dim=-1) / rel.shape[1] ** 0.5
    prior = _gather_rows(v, idx).float()
    if idx_mask is not None:
        prior = prior * idx_mask[..., None]
    # logits of the compact block: the selected columns of S with the old beta swapped for the new
    s_sel = _gather_cols(s, idx)
    if bias is not None:
        s_sel = s_sel - torch.gather(bias.float(), 1, idx)[:, None, :]
    if idx_mask is not None:
        s_sel = s_sel.masked_fill(~idx_mask[:, None, :], NEG_INF)
    p = torch.softmax(s_sel + beta[:, None, :], dim=-1)  # (B, n, t)
    if fit_values_:
        cv, ok = fit_values(p, o, prior, ridge, count)
    else:
        cv, ok = prior, torch.ones(idx.shape[0], dtype=torch.bool, device=idx.device)
    out_err = (p @ cv).sub(o).norm(dim=(1, 2)) / o.norm(dim=(1, 2)).clamp_min(1e-12)
    return Compacted(idx=idx, beta=beta, values=cv, values_ok=ok, output_error=out_err, mass_error=mass_err)
