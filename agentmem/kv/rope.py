"""RoPE re-rotation: moving post-RoPE keys or queries to other positions without the model.

With the HF "rotate_half" layout a row at position p is ``x0 * cos(p w) + rot(x0) * sin(p w)``, so
moving it by ``delta`` positions is the same rotation with angle ``delta * w``. Angles are formed
in fp64 (positions reach 1e5+ and ``w`` spans many decades), the product in fp32.
"""

from __future__ import annotations

import torch


def rotated(x: torch.Tensor, delta: torch.Tensor | float, inv_freq: torch.Tensor) -> torch.Tensor:
    """The first ``2 * len(inv_freq)`` features of ``x`` (..., L, d) moved by ``delta`` positions.

    ``delta``: one number, or a tensor (..., L) of per-row deltas. Returns (..., L, rot) in x.dtype;
    features past ``rot`` (partial rotary) are not rotated and not returned.
    """
    rot = 2 * inv_freq.numel()
    freq = inv_freq.to(x.device, torch.float64)  # (rot/2,)
    if isinstance(delta, torch.Tensor):
        ang = delta.to(x.device, torch.float64)[..., None] * freq  # (..., L, rot/2)
    else:
        ang = delta * freq
    emb = torch.cat([ang, ang], dim=-1)
    cos, sin = emb.cos().float(), emb.sin().float()
    half = rot // 2
    xr = x[..., :rot].float()
    x_rot = torch.cat([-xr[..., half:], xr[..., :half]], dim=-1)
    return (xr * cos + x_rot * sin).to(x.dtype)
