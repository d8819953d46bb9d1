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

from .carries import DEFAULT_CHUNK, carries, chunk_length, split_into_chunks


def bi_wkv_chunked(w, u, k, v, chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
    """Bi-WKV of ``k, v`` (B, T, C) with decay ``w`` and bonus ``u`` (C,).

    float16/bfloat16 inputs are computed in float32 and returned in their own
    dtype; float64 is computed in float64.  Differentiable in all four inputs
    (for a forward pass alone :func:`.recurrent.bi_wkv_recurrent` is faster).
    """
    out_dtype = k.dtype
    dtype = torch.float64 if k.dtype == torch.float64 else torch.float32
    w, u, k, v = (t.to(dtype) for t in (w, u, k, v))
    B, T, C = k.shape
    L = chunk_length(w, T, chunk)
    k_chunks, v_chunks = split_into_chunks(k, v, L)
    n_chunks = k_chunks.shape[1]
    N = B * n_chunks
    k_chunks, v_chunks = k_chunks.reshape(N, L, C), v_chunks.reshape(N, L, C)
    m = k_chunks.detach().amax(1, keepdim=True)              # (N, 1, C) reference per chunk

    e = torch.exp(k_chunks - m)
    ex = torch.stack([e * v_chunks, e])                       # (2, N, L, C): numerator, denominator

    # One convolution gives the in-chunk sums at positions 0..L-1 and, at the virtual
    # positions -1 and L, the chunk's summaries as seen from its neighbours.
    out = _ToeplitzConv.apply(_as_image(ex, L), w, u, L)
    seen_from_right = out[:, :, L + 1, 0].view(2, B, n_chunks, C)     # summary at position L
    seen_from_left = out[:, :, 0, 0].view(2, B, n_chunks, C)          # summary at position -1
    carry_left, carry_right, shift = carries(m.view(B, n_chunks, C), seen_from_right, seen_from_left, w, L)
    body = out[:, :, 1:L + 1]                                  # (2N, C, L, 1)
    if bool((shift > 0).any()):
        body = body * torch.exp(-shift).to(dtype).view(N, C, 1, 1).repeat(2, 1, 1, 1)

    # A carry reaches token tau of its chunk as a token at -1 (or L) would: e^{-tau w} (e^{-(L-1-tau) w}).
    tau = torch.arange(L, dtype=dtype, device=k.device)
    from_left = torch.exp(-tau[None, :] * w[:, None])[:, :, None]            # (C, L, 1)
    from_right = torch.exp(-(L - 1 - tau)[None, :] * w[:, None])[:, :, None]
    carry_left = carry_left.to(dtype).view(2 * N, C, 1, 1)
    carry_right = carry_right.to(dtype).view(2 * N, C, 1, 1)
    body = body + carry_left * from_left + carry_right * from_right
    y = body[:N] / body[N:]
    y = y.permute(0, 2, 3, 1).reshape(B, n_chunks * L, C)
    return y[:, :T].to(out_dtype)


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
        # Autograd assembles this gradient from the slices of ``out`` in a fresh NCHW tensor;
        # the convolutions and products below run in image's channels_last layout, and on a
        # mix of the two take a slow path (f+b at (4, 1024, 288): ~75 -> ~55 ms).
        grad_out = grad_out.contiguous(memory_format=torch.channels_last)
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
