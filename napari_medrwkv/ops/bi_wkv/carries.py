"""What the chunked paths share: the chunk length and the carries between chunks.

A chunk of L tokens is summarised, as its neighbours see it, by two numbers per
channel and side (numerator, denominator); the carry into chunk c is the
exclusive prefix (left) or suffix (right) sum of those summaries, decayed by
e^{-L w} per chunk.  The carries enter a chunk as *virtual tokens* at positions
-1 and L, so both paths add them with the in-chunk decay factors they already use.
"""
import math

import torch
import torch.nn.functional as F

DEFAULT_CHUNK = 16
_MAX_DECAY_PER_CHUNK = 20.0    # bound on |w| * L: in-chunk factors stay below e^20
_MAX_CARRY_LOG = 40.0          # carries are rescaled to at most e^40 times the chunk's own terms
_FLOAT32_SPREAD = 60.0         # chunk-level log-scale spread that float32 exp handles safely


def chunk_length(w, T: int, chunk: int) -> int:
    max_decay = float(w.detach().abs().max()) if w.numel() else 0.0
    L = min(chunk, T)
    if max_decay * L > _MAX_DECAY_PER_CHUNK:
        L = max(1, int(_MAX_DECAY_PER_CHUNK / max_decay))
    return L


def split_into_chunks(k, v, L: int):
    """k, v (B, T, C) as (B, n, L, C) chunks, T padded up to whole chunks with keys of -inf
    (e^{-inf} = 0: padding adds nothing) and values of 0."""
    B, T, C = k.shape
    pad = -T % L
    if pad:
        k = F.pad(k, (0, 0, 0, pad), value=float("-inf"))
        v = F.pad(v, (0, 0, 0, pad))
    n = (T + pad) // L
    return k.reshape(B, n, L, C), v.reshape(B, n, L, C)


def carries(m, summary_left, summary_right, w, L: int):
    """Left/right carries of every chunk as virtual-token values.

    m: (B, n, C) chunk references; summaries: (2, B, n, C) [num, den] in units of e^m.
    Returns the left and right carries (2, B, n, C) in units of e^{m - shift}, and
    shift (B, n, C) >= 0, by which the chunk's own terms must be scaled down so
    that a carry never exceeds e^40 of them.

    The right carry is the left carry of the reversed sequence, so both sides run
    as one stacked problem: P_c = sum_{c' < c} e^{-(c-1-c') L w} e^{m_c'} S_c', an
    exclusive prefix sum taken relative to the largest term of each sequence.
    Differentiable; :func:`carries_in_range` is the faster forward-only form.
    """
    n = m.shape[1]
    refs = torch.stack([m, m.flip(1)])                                  # (side, B, n, C)
    sums = torch.stack([summary_left, summary_right.flip(2)])           # (side, 2, B, n, C)
    c = torch.arange(n, dtype=m.dtype, device=m.device)[:, None] * (L * w)
    log_scale = refs + c                     # chunk c' as seen from the far end, up to a constant
    spread = float((log_scale.amax(2) - log_scale.amin(2)).max().detach())
    hp = torch.float32 if m.dtype == torch.float32 and spread < _FLOAT32_SPREAD else torch.float64
    log_scale, refs, c, sums = log_scale.to(hp), refs.to(hp), c.to(hp), sums.to(hp)
    top = log_scale.amax(2, keepdim=True)
    acc = torch.cumsum(torch.exp(log_scale - top).unsqueeze(1) * sums, 3)
    acc = F.pad(acc[..., :-1, :], (0, 0, 1, 0))         # exclusive: shifted, never total minus term
    log_den = torch.log(acc[:, 1]) + (top - c + L * w.to(hp) - refs)   # -inf where there is no carry
    log_den = torch.stack([log_den[0], log_den[1].flip(1)])
    acc = torch.stack([acc[0], acc[1].flip(2)])
    shift = (log_den.amax(0) - _MAX_CARRY_LOG).clamp(min=0)
    den = torch.exp(log_den - shift)
    present = acc[:, 1] > 0
    ratio = torch.where(present, acc[:, 0] / torch.where(present, acc[:, 1], 1.0), 0.0)
    carries = torch.stack([ratio * den, den], 1)                        # (side, 2, B, n, C)
    return carries[0], carries[1], shift


def carries_in_range(m, summary_left, summary_right, w, L: int):
    """:func:`carries` without log space, for the common case; forward only.

    When every chunk's log scale m_c' + c' L w lies within e^40 of the largest
    one of its sequence, the prefix sums can be taken on plainly scaled
    summaries and scaled back by a division, with nothing near the float32
    range.  Returns (left, right) carries, (2, B, n, C) each, equal to those of
    :func:`carries` (whose shift is then zero), or None where the range is
    wider or a carry would exceed e^40 of its chunk's own terms: call
    :func:`carries` then.
    """
    B, n, C = m.shape
    reverse = torch.arange(n - 1, -1, -1, device=m.device)
    # Side 1 is the reversed sequence: its left carries are the right carries.
    log_scale = torch.empty(2, B, n, C, dtype=m.dtype, device=m.device)
    log_scale[0] = m
    torch.index_select(m, 1, reverse, out=log_scale[1])
    log_scale += torch.arange(n, dtype=m.dtype, device=m.device)[:, None] * (L * w)
    log_scale -= log_scale.amax(2, keepdim=True)
    if float(log_scale.amin()) < -_MAX_CARRY_LOG:
        return None
    scale = log_scale.exp_()                                     # in [e^-40, 1]
    terms = torch.empty(2, 2, B, n, C, dtype=m.dtype, device=m.device)
    torch.mul(summary_left, scale[0], out=terms[0])
    torch.index_select(summary_right, 2, reverse, out=terms[1])
    terms[1] *= scale[1]
    acc = torch.empty_like(terms)
    acc[..., 0, :] = 0                                           # exclusive: the first chunk gets nothing
    torch.cumsum(terms[..., :-1, :], 3, out=acc[..., 1:, :])
    acc *= (torch.exp(L * w) / scale).unsqueeze(1)               # back to units of each chunk's own e^m
    if not float(acc[:, 1].amax()) <= math.exp(_MAX_CARRY_LOG):  # also catches inf and nan
        return None
    return acc[0], torch.index_select(acc[1], 2, reverse)
