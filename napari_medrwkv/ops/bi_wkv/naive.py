"""Obviously-correct O(T^2) Bi-WKV reference, in float64.

Every fast path is tested against this.  It builds the full (T, T) weight
matrix of the Vision-RWKV formula, so keep T small (a few thousand at most).
"""
import torch


def bi_wkv_naive(w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """wkv_t = (sum_{i!=t} e^{-(|t-i|-1) w + k_i} v_i + e^{u + k_t} v_t) / (same with v = 1).

    Computed in float64 with a per-output max subtraction (a softmax over i),
    so it is exact to float64 rounding for any finite inputs.  Returns float64.  Differentiable.
    """
    w, u, k, v = (t.to(torch.float64) for t in (w, u, k, v))
    T = k.shape[1]
    idx = torch.arange(T, dtype=torch.float64, device=k.device)
    dist = (idx[:, None] - idx[None, :]).abs()                     # (t, i)
    log_decay = -(dist - 1)[:, :, None] * w                         # (t, i, C)
    diagonal = torch.eye(T, dtype=torch.bool, device=k.device)[:, :, None]
    log_decay = torch.where(diagonal, u.expand_as(log_decay), log_decay)
    logits = log_decay.unsqueeze(0) + k.unsqueeze(1)                # (B, t, i, C)
    weights = torch.softmax(logits, dim=2)
    return (weights * v.unsqueeze(1)).sum(2)
