"""Bi-WKV in pure PyTorch: chunked, O(B*T*C), no compiler, any device.

The sequence is cut into chunks of L tokens.  Three facts make it fast:

1. Inside a chunk the Bi-WKV weights form a symmetric Toeplitz kernel
   ``K[d] = e^{-(|d|-1) w}`` (d != 0), ``K[0] = e^u``, so numerator and
   denominator within a chunk are one depthwise convolution (oneDNN on CPU).
   Evaluated one position beyond each end (-1 and L), the same convolution
   gives the chunk's summary as its neighbours see it.
2. Everything left of chunk c reaches its token tau with weight
   ``e^{-tau w} * P_c`` -- the weight a *virtual token* at position -1 of the
   chunk would have (and the right carry Q_c a token at position L), so the
   carries enter as two rank-one updates of the convolution's output.
3. The carries are exclusive prefix/suffix sums of the per-chunk summaries,
   a problem L times smaller than the original; the right one is the left
   one of the reversed sequence, so both run as one stacked computation.

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
        ex = torch.empty(2, N, L, C, dtype=dtype, device=k.device)
        torch.sub(k_chunks, m, out=ex[1])
        ex[1].exp_()
        torch.mul(ex[1], v_chunks, out=ex[0])

    # One convolution gives the in-chunk sums at positions 0..L-1 and, at the virtual
    # positions -1 and L, the chunk's summaries as seen from its neighbours.
    if differentiable:
        out = _ToeplitzConv.apply(_as_image(ex, L), w, u, L)
    else:
        out = F.conv2d(_as_image(ex, L), _toeplitz_kernel(w, u, L), padding=(L + 1, 0), groups=C)
    seen_from_right = out[:, :, L + 1, 0].view(2, B, n_chunks, C)     # summary at position L
    seen_from_left = out[:, :, 0, 0].view(2, B, n_chunks, C)          # summary at position -1
    carry_left, carry_right, shift = _carries(m.view(B, n_chunks, C), seen_from_right, seen_from_left, w, L)
    body = out[:, :, 1:L + 1]                                  # (2N, C, L, 1)
    if bool((shift > 0).any()):
        body = body * torch.exp(-shift).to(dtype).view(N, C, 1, 1).repeat(2, 1, 1, 1)

    # A carry reaches token tau of its chunk as a token at -1 (or L) would: e^{-tau w} (e^{-(L-1-tau) w}).
    tau = torch.arange(L, dtype=dtype, device=k.device)
    from_left = torch.exp(-tau[None, :] * w[:, None])[:, :, None]            # (C, L, 1)
    from_right = torch.exp(-(L - 1 - tau)[None, :] * w[:, None])[:, :, None]
    carry_left = carry_left.to(dtype).view(2 * N, C, 1, 1)
    carry_right = carry_right.to(dtype).view(2 * N, C, 1, 1)
    if differentiable:
        body = body + carry_left * from_left + carry_right * from_right
    else:
        body = body.addcmul_(carry_left, from_left).addcmul_(carry_right, from_right)
    y = body[:N] / body[N:]
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
    """(2, N, length, C) tokens as a channels_last (2N, C, length, 1) image: a view, no copy."""
    C = x.shape[-1]
    return x.reshape(-1, length, 1, C).permute(0, 3, 1, 2)


class _ToeplitzConv(torch.autograd.Function):
    """The in-chunk convolution with its kernel built from (w, u), with a hand-written backward.

    Autograd would ask oneDNN for the depthwise *kernel* gradient, which is two orders
    of magnitude slower than the convolution itself.  Only two numbers per channel
    depend on it, so: dL/dw = <g, conv(x, dK/dw)> and dL/du = e^u <g, x shifted to the
    centre tap>; the input gradient is a convolution with the same (symmetric) kernel.
    """

    @staticmethod
    def forward(ctx, image, w, u, L: int):
        ctx.save_for_backward(image, w, u)
        ctx.L = L
        return F.conv2d(image, _toeplitz_kernel(w, u, L), padding=(L + 1, 0), groups=w.shape[0])

    @staticmethod
    def backward(ctx, grad_out):
        image, w, u = ctx.saved_tensors
        L, C = ctx.L, w.shape[0]
        grad_image = grad_w = grad_u = None
        if ctx.needs_input_grad[0]:
            grad_image = F.conv2d(grad_out, _toeplitz_kernel(w, u, L), padding=(L - 1, 0), groups=C)
        if ctx.needs_input_grad[1]:
            d_kernel = _toeplitz_kernel_dw(w, L)
            grad_w = (grad_out * F.conv2d(image, d_kernel, padding=(L + 1, 0), groups=C)).sum((0, 2, 3))
        if ctx.needs_input_grad[2]:
            # The centre tap of output position o (= token o - 1) sees input o - 1.
            grad_u = (grad_out[:, :, 1:L + 1] * image).sum((0, 2, 3)) * torch.exp(u)
        return grad_image, grad_w, grad_u, None


def _toeplitz_kernel_dw(w, L: int):
    """d/dw of :func:`_toeplitz_kernel`: -(|d|-1) e^{-(|d|-1) w}, and 0 at the centre."""
    offsets = torch.arange(-L, L + 1, dtype=w.dtype, device=w.device).abs()
    kernel = -(offsets - 1)[None, :] * torch.exp(-(offsets - 1)[None, :] * w[:, None])
    kernel[:, L] = 0
    return kernel[:, None, :, None]


def _toeplitz_kernel(w, u, L: int):
    """Depthwise conv weight (C, 1, 2L+1, 1): K[d] = e^{-(|d|-1) w}, K[0] = e^u."""
    offsets = torch.arange(-L, L + 1, dtype=w.dtype, device=w.device).abs()
    kernel = torch.exp(-(offsets - 1)[None, :] * w[:, None])
    kernel = torch.cat([kernel[:, :L], torch.exp(u)[:, None], kernel[:, L + 1:]], dim=1)
    return kernel[:, None, :, None]


def _carries(m, summary_left, summary_right, w, L: int):
    """Left/right carries of every chunk as virtual-token values.

    m: (B, n, C) chunk references; summaries: (2, B, n, C) [num, den] in units of e^m.
    Returns the left and right carries (2, B, n, C) in units of e^{m - shift}, and
    shift (B, n, C) >= 0, by which the chunk's own terms must be scaled down so
    that a carry never exceeds e^40 of them.

    The right carry is the left carry of the reversed sequence, so both sides run
    as one stacked problem: P_c = sum_{c' < c} e^{-(c-1-c') L w} e^{m_c'} S_c', an
    exclusive prefix sum taken relative to the largest term of each sequence.
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
