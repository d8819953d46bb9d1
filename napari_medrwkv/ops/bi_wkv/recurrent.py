"""Bi-WKV forward for inference: chunk-parallel recurrences in pure PyTorch, no autograd.

The same decomposition as :mod:`.chunked` (per-chunk max of k as reference,
chunk summaries, carries as virtual tokens), with the in-chunk sums taken by a
short recurrence instead of a Toeplitz convolution::

    S_0 = carry into the chunk,   S_{tau+1} = e^{-w} S_tau + x_tau      (left)

run for all chunks and channels at once, one position per step.  Tokens are
laid out position-major, (2, B, L, n, C), so every step reads and writes one
contiguous block; the recurrence touches each value a constant number of times,
where the convolution multiplies by a 2L+1 tap kernel, and the carries start
the recurrence instead of costing two extra passes.  The chunk summaries the
carries need come from a pairwise (tree) fold, log2(L) operations per side.

Numerics are those of :mod:`.chunked` (same chunk length rule, same carries).
Use :func:`.chunked.bi_wkv_chunked` when gradients are needed.
"""
import torch

from .carries import DEFAULT_CHUNK, carries, chunk_length, split_into_chunks


def bi_wkv_recurrent(w, u, k, v, chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
    """Bi-WKV of ``k, v`` (B, T, C) with decay ``w`` and bonus ``u`` (C,); forward only.

    float16/bfloat16 inputs are computed in float32 and returned in their own
    dtype; float64 is computed in float64.  The result carries no gradient.
    """
    out_dtype = k.dtype
    dtype = torch.float64 if k.dtype == torch.float64 else torch.float32
    w, u, k, v = (t.detach().to(dtype) for t in (w, u, k, v))
    B, T, C = k.shape
    L = chunk_length(w, T, chunk)
    k_chunks, v_chunks = split_into_chunks(k, v, L)
    n = k_chunks.shape[1]
    m = k_chunks.amax(2, keepdim=True)                         # (B, n, 1, C)

    x = torch.empty(2, B, L, n, C, dtype=dtype, device=k.device)   # [numerator, denominator] terms
    e = x[1].permute(0, 2, 1, 3)
    torch.sub(k_chunks, m, out=e)
    e.exp_()
    torch.mul(e, v_chunks, out=x[0].permute(0, 2, 1, 3))

    decay = torch.exp(-w)
    seen_from_right, seen_from_left = _fold(x, decay, reverse=False), _fold(x, decay, reverse=True)
    carry_left, carry_right, shift = carries(m.view(B, n, C), seen_from_right, seen_from_left, w, L)
    if bool((shift > 0).any()):
        x.mul_(torch.exp(-shift).to(dtype).view(1, B, 1, n, C))

    total = _sweeps(x, carry_left.to(dtype).contiguous(), carry_right.to(dtype).contiguous(), decay, torch.exp(u))
    y = torch.empty(B, n, L, C, dtype=dtype, device=k.device)
    torch.div(total[0], total[1], out=y.permute(0, 2, 1, 3))
    return y.view(B, n * L, C)[:, :T].to(out_dtype)


def _fold(x, decay, reverse: bool):
    """Per chunk: sum_tau decay^(L-1-tau) x_tau (as the next chunk sees it), or with
    ``reverse`` sum_tau decay^tau x_tau (as the previous one does).  (2, B, n, C).

    Pairs of neighbours merge into one term per level, the decay squaring each time.
    """
    q = decay
    while x.shape[2] > 1:
        if x.shape[2] % 2:   # a zero term at the far end keeps the weights of the others
            zero = x.new_zeros(x.shape[:2] + (1,) + x.shape[3:])
            x = torch.cat([zero, x] if not reverse else [x, zero], dim=2)
        near, far = (x[:, :, 1::2], x[:, :, 0::2]) if not reverse else (x[:, :, 0::2], x[:, :, 1::2])
        x = torch.addcmul(near, far, q)
        q = q * q
    return x[:, :, 0]


def _sweeps(x, carry_left, carry_right, decay, bonus):
    """numerator/denominator at every token: the left and right exclusive decayed sums,
    each started from its carry, plus the token's own term times e^u.  (2, B, L, n, C)."""
    L = x.shape[2]
    total = torch.empty_like(x)
    state = carry_left
    for t in range(L):
        torch.addcmul(state, x[:, :, t], bonus, out=total[:, :, t])
        if t < L - 1:
            torch.addcmul(x[:, :, t], state, decay, out=state)
    state = carry_right
    for t in range(L - 1, -1, -1):
        total[:, :, t] += state
        if t > 0:
            torch.addcmul(x[:, :, t], state, decay, out=state)
    return total
