"""Bi-WKV in pure PyTorch: chunked, O(B*T*C), no compiler, any device.

The sequence is cut into chunks of L tokens.  Three facts make it fast:

1. Inside a chunk the Bi-WKV weights form a symmetric Toeplitz kernel
   ``K[d] = e^{-(|d|-1) w}`` (d != 0), ``K[0] = e^u``, so numerator and
   denominator within a chunk are one depthwise convolution (oneDNN on CPU).
2. Everything left of chunk c reaches its token tau with weight
   ``e^{-tau w} * P_c`` -- exactly the weight a token at position -1 of the
   chunk would have.  So the left carry P_c is written into a *virtual token*
   at position -1 and the right carry Q_c into one at position L, and the same
   convolution yields the finished numerator and denominator.
3. The carries are exclusive prefix/suffix sums of per-chunk summaries, a
   problem L times smaller than the original.

Numerics: every chunk uses its own max of k as reference (so ``e^{k - m}``
never overflows, for any range of k), the in-chunk decay factors are bounded by
``e^{|w| L}`` with L chosen so that |w| L <= 20, and carries are exponentiated
from log space.  The chunk-level sums run in float32 while the spread of the
per-chunk log scales is small and switch to float64 otherwise; they stay exact
while ``|w| * T`` plus the spread of k is below ~600.  Beyond that, carries
more than e^-700 below the largest one are flushed to zero.  ``u`` is assumed
below ~40 (models pass ``spatial_first / T``).
"""
import torch
import torch.nn.functional as F

DEFAULT_CHUNK = 16
_MAX_DECAY_PER_CHUNK = 20.0    # bound on |w| * L: in-chunk factors stay below e^20
_MAX_CARRY_LOG = 40.0          # carries are rescaled to at most e^40 times the chunk's own terms
_FLOAT32_SPREAD = 60.0         # chunk-level log-scale spread that float32 exp handles safely


def bi_wkv_chunked(w, u, k, v, chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
    """Bi-WKV of ``k, v`` (B, T, C) with decay ``w`` and bonus ``u`` (C,).

    float16/bfloat16 inputs are computed in float32 and returned in their own
    dtype; float64 is computed in float64.  Differentiable in all four inputs.
    """
    out_dtype = k.dtype
    dtype = torch.float64 if k.dtype == torch.float64 else torch.float32
    w, u, k, v = (t.to(dtype) for t in (w, u, k, v))
    B, T, C = k.shape
    L = _chunk_length(w, T, chunk)
    n_chunks = -(-T // L)
    pad = n_chunks * L - T
    if pad:
        k = F.pad(k, (0, 0, 0, pad), value=float("-inf"))   # e^{-inf} = 0: padding adds nothing
        v = F.pad(v, (0, 0, 0, pad))
    N = B * n_chunks
    k_chunks = k.reshape(N, L, C)
    v_chunks = v.reshape(N, L, C)
    m = k_chunks.detach().amax(1, keepdim=True)              # (N, 1, C) reference per chunk

    differentiable = torch.is_grad_enabled() and any(t.requires_grad for t in (w, u, k, v))
    if differentiable:
        e = torch.exp(k_chunks - m)
        ex = torch.stack([e * v_chunks, e])                   # (2, N, L, C): numerator, denominator
    else:
        buf = torch.empty(2, N, L + 2, C, dtype=dtype, device=k.device)
        ex = buf[:, :, 1:L + 1]
        torch.sub(k_chunks, m, out=ex[1])
        ex[1].exp_()
        torch.mul(ex[1], v_chunks, out=ex[0])

    tau = torch.arange(L, dtype=dtype, device=k.device)[:, None]
    to_right_end = torch.exp(-(L - 1 - tau) * w)              # (L, C): weight to position L
    to_left_end = torch.exp(-tau * w)                         # (L, C): weight to position -1
    summary_left = (ex * to_right_end).sum(2).view(2, B, n_chunks, C)
    summary_right = (ex * to_left_end).sum(2).view(2, B, n_chunks, C)
    carry_left, carry_right, shift = _carries(m.view(B, n_chunks, C), summary_left, summary_right, w, L)
    carry_left = carry_left.to(dtype).view(2, N, 1, C)
    carry_right = carry_right.to(dtype).view(2, N, 1, C)
    scale = torch.exp(-shift).to(dtype).view(1, N, 1, C) if bool((shift > 0).any()) else None

    if differentiable:
        if scale is not None:
            ex = ex * scale
        x = torch.cat([carry_left, ex, carry_right], dim=2)   # (2, N, L+2, C)
    else:
        if scale is not None:
            ex.mul_(scale)
        buf[:, :, :1] = carry_left
        buf[:, :, L + 1:] = carry_right
        x = buf

    kernel = _toeplitz_kernel(w, u, L)
    out = F.conv2d(_as_image(x, L + 2), kernel, padding=(L - 1, 0), groups=C)   # (2N, C, L, 1)
    y = out[:N] / out[N:]
    y = y.permute(0, 2, 3, 1).reshape(B, n_chunks * L, C)
    if pad:
        y = y[:, :T]
    return y.to(out_dtype)


def _chunk_length(w, T: int, chunk: int) -> int:
    max_decay = float(w.detach().abs().max()) if w.numel() else 0.0
    L = min(chunk, T)
    if max_decay * L > _MAX_DECAY_PER_CHUNK:
        L = max(1, int(_MAX_DECAY_PER_CHUNK / max_decay))
    return L


def _as_image(x, length: int):
    """(2, N, length, C) tokens as a channels_last (2N, C, length, 1) image, a view when possible."""
    C = x.shape[-1]
    return x.reshape(-1, length, 1, C).permute(0, 3, 1, 2)


def _toeplitz_kernel(w, u, L: int):
    """Depthwise conv weight (C, 1, 2L+1, 1): K[d] = e^{-(|d|-1) w}, K[0] = e^u."""
    offsets = torch.arange(-L, L + 1, dtype=w.dtype, device=w.device).abs()
    kernel = torch.exp(-(offsets - 1)[None, :] * w[:, None])
    kernel = torch.cat([kernel[:, :L], torch.exp(u)[:, None], kernel[:, L + 1:]], dim=1)
    return kernel[:, None, :, None]


def _exclusive_cumsum(x, dim: int):
    # Shifted rather than cumsum - x: subtracting loses everything when one term dominates.
    total = torch.cumsum(x, dim)
    zero = torch.zeros_like(total.narrow(dim, 0, 1))
    return torch.cat([zero, total.narrow(dim, 0, x.shape[dim] - 1)], dim)


def _carries(m, summary_left, summary_right, w, L: int):
    """Left/right carries of every chunk as virtual-token values.

    m: (B, n, C) chunk references; summaries: (2, B, n, C) in units of e^m.
    Returns carries (2, B, n, C) in units of e^{m - shift} and shift (B, n, C) >= 0,
    the amount by which the chunk's own terms must be scaled down so that a
    carry never exceeds e^40 of them.
    """
    n = m.shape[1]
    c = torch.arange(n, dtype=m.dtype, device=m.device)[:, None]
    log_left = m + c * (L * w)          # chunk c' as seen from the right, up to a constant
    log_right = m - c * (L * w)
    spread = torch.maximum(log_left.amax(1) - log_left.amin(1), log_right.amax(1) - log_right.amin(1))
    hp = torch.float32 if m.dtype == torch.float32 and float(spread.detach().max()) < _FLOAT32_SPREAD else torch.float64
    m, w, c = m.to(hp), w.to(hp), c.to(hp)
    log_left, log_right = log_left.to(hp), log_right.to(hp)

    top_left = log_left.amax(1, keepdim=True)
    left = _exclusive_cumsum(torch.exp(log_left - top_left) * summary_left.to(hp), 2)
    left_log_unit = top_left - (c - 1) * (L * w) - m
    top_right = log_right.amax(1, keepdim=True)
    right = _exclusive_cumsum((torch.exp(log_right - top_right) * summary_right.to(hp)).flip(2), 2).flip(2)
    right_log_unit = top_right + (c + 1) * (L * w) - m

    log_left_den = torch.log(left[1]) + left_log_unit       # -inf where there is no carry
    log_right_den = torch.log(right[1]) + right_log_unit
    shift = (torch.maximum(log_left_den, log_right_den) - _MAX_CARRY_LOG).clamp(min=0)
    return (_from_log(left, log_left_den - shift), _from_log(right, log_right_den - shift), shift)


def _from_log(carry, log_den):
    """Carry (num, den) given den in log space: den = e^log_den, num = den * (num/den)."""
    den = torch.exp(log_den)
    present = carry[1] > 0
    ratio = torch.where(present, carry[0] / torch.where(present, carry[1], torch.ones_like(carry[1])), 0)
    return torch.stack([ratio * den, den])
