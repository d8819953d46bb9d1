"""An experiment, not a path of the op: Bi-WKV's in-chunk sums as matrix products.

    python bench/wkv_chunk_gemm.py [--threads 2] [--chunk 16]

Within a chunk the decay factorises, e^{-(t-1-i) w} = e^{-(t-1) w} e^{i w}, so after
scaling each token by e^{+-i w} the in-chunk sums of every channel become one
product with a channel-free triangular matrix of ones, and the carries enter as
an extra row (a virtual token).  Numerics as the op's chunked paths (per-chunk max
of k, |w| L bounded); the script checks it against the float64 reference, then
times it against the plain cumsum scan and the op's recurrent path in alternating
rounds, with the two matrix products alone for scale.  Measured on 2026-12-06 on a
2-core AVX-512 CPU: 10 ms against the recurrent path's 3.4 ms at (1, 4096, 288)
(bench/RESULTS.md, "Bi-WKV on the CPU"), so the op does not use it.
"""
import argparse

import torch
from timing import interleaved_median_seconds, memory_setting
from wkv_cpu import inputs, plain_cumsum_scan

from napari_medrwkv.ops.bi_wkv import bi_wkv_naive, bi_wkv_recurrent
from napari_medrwkv.ops.bi_wkv.carries import carries_in_range, split_into_chunks


def bi_wkv_chunk_gemm(w, u, k, v, L):
    B, T, C = k.shape
    if float(w.abs().max()) * L > 12:     # keeps e^{3|w|L} times a carry of e^40 inside float32
        raise ValueError("this experiment covers |w| L <= 12 only")
    k_chunks, v_chunks = split_into_chunks(k, v, L)
    n = k_chunks.shape[1]
    m = k_chunks.amax(2, keepdim=True)
    tw = torch.arange(L, dtype=k.dtype)[:, None] * w                  # (L, C)
    # Row 0 of `plus` is the left carry, row L of `minus` the right one; the rest are the
    # chunk's tokens [e v, e] scaled by e^{+tw} and e^{-tw}.
    plus = torch.empty(B, n, L + 1, 2 * C, dtype=k.dtype)
    minus = torch.empty(B, n, L + 1, 2 * C, dtype=k.dtype)
    tokens = plus[:, :, 1:]
    torch.exp(k_chunks - m + tw, out=tokens[..., C:])
    torch.mul(tokens[..., C:], v_chunks, out=tokens[..., :C])
    torch.mul(tokens, torch.exp(-2 * tw).repeat(1, 2), out=minus[:, :, :L])

    def sides(s):                                                       # (B, n, 2C) -> (2, B, n, C)
        return s.view(B, n, 2, C).permute(2, 0, 1, 3)
    seen_from_right = sides(tokens.sum(2) * torch.exp(-(L - 1) * w).repeat(2))
    seen_from_left = sides(minus[:, :, :L].sum(2))
    carry_left, carry_right = carries_in_range(m.view(B, n, C), seen_from_right, seen_from_left, w, L)
    sides(plus[:, :, 0]).copy_(carry_left * torch.exp(-w))
    sides(minus[:, :, L]).copy_(carry_right * torch.exp(-L * w))
    ones = torch.ones(L, L + 1, dtype=k.dtype)
    left = torch.matmul(ones.tril(0), plus)                            # rows j <= t: carry and tokens before t
    right = torch.matmul(ones.triu(1), minus)                          # rows j > t: tokens after t and carry
    # Numerator and denominator share the factor e^{-(t-1) w}, so it is divided out of both.
    left.addcmul_(right, torch.exp(2 * tw).repeat(1, 2))
    left.addcmul_(tokens, torch.exp(u - w).repeat(2))
    return (left[..., :C] / left[..., C:]).reshape(B, n * L, C)[:, :T]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--chunk", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=25)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    L = args.chunk
    for shape in [(1, 37, 5), (2, 100, 7), (1, 512, 64)]:
        w, u, k, v = inputs(*shape)
        ref = bi_wkv_naive(w.double(), u.double(), k.double(), v.double())
        err = float((bi_wkv_chunk_gemm(w, u, k, v, L).double() - ref).norm() / ref.norm())
        print(f"{shape}: rel.err against the float64 reference {err:.1e}")
    w, u, k, v = inputs(1, 4096, 288)
    n = 4096 // L
    ones, tokens = torch.ones(L, L + 1).tril(0), torch.rand(n, L + 1, 576)
    with torch.inference_mode():
        ms = interleaved_median_seconds({
            "plain cumsum scan": lambda: plain_cumsum_scan(w, u, k, v),
            "recurrent (the op)": lambda: bi_wkv_recurrent(w, u, k, v),
            "chunk GEMM": lambda: bi_wkv_chunk_gemm(w, u, k, v, L),
            "its two products alone": lambda: (torch.matmul(ones, tokens), torch.matmul(ones, tokens)),
        }, args.rounds)
    print(f"(1, 4096, 288), float32, {args.threads} threads, chunk {L}, {memory_setting()}, median ms")
    for name, seconds in ms.items():
        print(f"| {name} | {seconds * 1e3:.2f} |")


if __name__ == "__main__":
    main()
