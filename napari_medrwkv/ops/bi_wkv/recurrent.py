"""Bi-WKV forward for inference: chunk-parallel recurrences in pure PyTorch, no autograd.

The same decomposition as :mod:`.chunked` (per-chunk max of k as reference,
chunk summaries, carries as virtual tokens), with the in-chunk sums taken by
short recurrences instead of a Toeplitz convolution, for all chunks and
channels at once, one position per step::

    R_tau = x_tau + e^{-w} R_{tau+1}        (right-to-left sweep, from zero)
    S_tau = x_tau + e^{-w} S_{tau-1}        (left-to-right sweep, from the left carry)

Tokens are laid out position-major, (2, B, L, n, C), so every step reads and
writes one contiguous block.  The right-to-left sweep ends with both chunk
summaries (its final state, and a decay-weighted sum it gathers on the way),
so the carries cost no extra pass over the tokens; the left-to-right sweep
starts from the left carry, adds the right carry as a token at position L
would arrive, and divides.  Seven element-wise operations per position in all.

Numerics are those of :mod:`.chunked` (same chunk length rule, same carries).
Use :func:`.chunked.bi_wkv_chunked` when gradients are needed.
"""
import torch

from .carries import DEFAULT_CHUNK, carries, carries_in_range, chunk_length, split_into_chunks


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
    powers = decay ** torch.arange(L, dtype=dtype, device=k.device)[:, None]   # (L, C): e^{-j w}
    total, summary_left, summary_right = _right_sweep(x, decay, torch.exp(u), powers)

    m = m.view(B, n, C)
    in_range = carries_in_range(m, summary_left, summary_right, w, L)
    if in_range is not None:
        carry_left, carry_right = in_range
    else:
        carry_left, carry_right, shift = carries(m, summary_left, summary_right, w, L)
        carry_left, carry_right = carry_left.to(dtype), carry_right.to(dtype)
        if bool((shift > 0).any()):
            scale_down = torch.exp(-shift).to(dtype).view(1, B, 1, n, C)
            x *= scale_down
            total *= scale_down
    return _left_sweep(x, total, carry_left.contiguous(), carry_right.contiguous(), decay, powers)[:, :T].to(out_dtype)


def _right_sweep(x, decay, bonus, powers):
    """Own term times e^u plus the right-exclusive in-chunk sum, at every position (2, B, L, n, C);
    and the chunk summaries as the next chunk (sum_tau e^{-(L-1-tau) w} x_tau) and the
    previous one (sum_tau e^{-tau w} x_tau) see them, (2, B, n, C) each."""
    L = x.shape[2]
    total = torch.empty_like(x)
    state = x[:, :, L - 1].clone()
    torch.mul(state, bonus, out=total[:, :, L - 1])
    seen_from_right = state.clone()
    for t in range(L - 2, -1, -1):
        torch.addcmul(state, x[:, :, t], bonus, out=total[:, :, t])
        seen_from_right.addcmul_(x[:, :, t], powers[L - 1 - t])
        torch.addcmul(x[:, :, t], state, decay, out=state)
    return total, seen_from_right, state


def _left_sweep(x, total, carry_left, carry_right, decay, powers):
    """Adds the left sum (from the left carry) and the right carry to ``total`` and
    divides numerator by denominator: (B, n * L, C)."""
    _, B, L, n, C = x.shape
    y = torch.empty(B, n, L, C, dtype=x.dtype, device=x.device)
    state = carry_left
    for t in range(L):
        here = total[:, :, t]
        here += state
        here.addcmul_(carry_right, powers[L - 1 - t])   # the right carry arrives like a token at position L
        torch.div(here[0], here[1], out=y[:, :, t])
        if t < L - 1:
            torch.addcmul(x[:, :, t], state, decay, out=state)
    return y.view(B, n * L, C)
