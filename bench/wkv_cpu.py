"""Bi-WKV on the CPU: our PyTorch paths against a plain cumsum scan of the same formula.

    python bench/wkv_cpu.py [--threads 2]

Prints median milliseconds: forward under inference_mode for both paths (the
dispatcher runs the recurrent one there), forward+backward for the chunked one
(the dispatcher's choice when gradients are needed), and the speed-ups.  The
forward columns come from rounds that call the three in turn, so a machine whose
speed drifts affects them alike.  The plain scan is the textbook vectorisation: one global max
of k per sequence, e^{+-i w} factors, and full-length cumsums along T.

Both run with freed memory kept for reuse, as in the app (engine/memory.py: without it,
glibc maps every freed 4.7 MB buffer afresh, and the timings swing with the allocator's
state by up to 1.6x, the plain scan's most); ``MEDRWKV_RETAIN_MEMORY=0`` measures with
malloc as glibc sets it.
"""
import argparse

import torch
from timing import interleaved_median_seconds, median_seconds, memory_setting

from napari_medrwkv.ops.bi_wkv import bi_wkv_chunked, bi_wkv_naive, bi_wkv_recurrent


def plain_cumsum_scan(w, u, k, v):
    T = k.shape[1]
    t = torch.arange(T, dtype=k.dtype)[None, :, None]
    e = torch.exp(k - k.amax(1, keepdim=True))
    left, right = e * torch.exp(t * w), e * torch.exp(-t * w)
    left_num = (torch.cumsum(left * v, 1) - left * v) * torch.exp(-(t - 1) * w)
    left_den = (torch.cumsum(left, 1) - left) * torch.exp(-(t - 1) * w)
    right_num = (torch.flip(torch.cumsum(torch.flip(right * v, [1]), 1), [1]) - right * v) * torch.exp((t + 1) * w)
    right_den = (torch.flip(torch.cumsum(torch.flip(right, [1]), 1), [1]) - right) * torch.exp((t + 1) * w)
    self_weight = torch.exp(u) * e
    return (left_num + right_num + self_weight * v) / (left_den + right_den + self_weight)


def median_ms(fn, repeats):
    return median_seconds(fn, repeats) * 1e3


def inputs(B, T, C, seed=0):
    g = torch.Generator().manual_seed(seed)
    # Decays as the models pass them: spatial_decay in [-5, 3] divided by T.
    w = (torch.rand(C, generator=g) * 8 - 5) / T
    u = torch.randn(C, generator=g) / T
    return w, u, torch.randn(B, T, C, generator=g), torch.randn(B, T, C, generator=g)


def forward_backward_ms(fn, args, repeats):
    leaves = [a.clone().requires_grad_() for a in args]

    def step():
        out = fn(*leaves)
        out.sum().backward()
    return median_ms(step, repeats)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=25)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shapes = [(1, 4096, 288), (16, 256, 560), (4, 1024, 288), (1, 16384, 288)]
    memory = memory_setting()
    print(f"Bi-WKV CPU, float32, {args.threads} threads, {memory}, median ms")
    print(f"| {'B, T, C':>16} | plain fwd | chunked fwd | recurrent fwd | speed-up | plain f+b | chunked f+b "
          f"| speed-up | rel.err rec / chunk |")
    print("|---|---|---|---|---|---|---|---|---|")
    for shape in shapes:
        x = inputs(*shape)
        with torch.inference_mode():
            fwd = interleaved_median_seconds({f: (lambda f=f: f(*x)) for f in (plain_cumsum_scan, bi_wkv_chunked,
                                                                              bi_wkv_recurrent)}, args.repeats)
        plain_f, chunk_f, rec_f = (fwd[f] * 1e3 for f in (plain_cumsum_scan, bi_wkv_chunked, bi_wkv_recurrent))
        plain_b, chunk_b = forward_backward_ms(plain_cumsum_scan, x, 5), forward_backward_ms(bi_wkv_chunked, x, 5)
        small = [t[:1, :512] if t.dim() == 3 else t for t in x]
        with torch.no_grad():
            ref = bi_wkv_naive(*small)
            errs = [float((fn(*small).double() - ref).norm() / ref.norm()) for fn in (bi_wkv_recurrent, bi_wkv_chunked)]
        print(f"| {str(shape):>16} | {plain_f:9.2f} | {chunk_f:11.2f} | {rec_f:13.2f} | {plain_f / rec_f:7.1f}x | "
              f"{plain_b:9.2f} | {chunk_b:11.2f} | {plain_b / chunk_b:7.1f}x | {errs[0]:.1e} / {errs[1]:.1e} |")


if __name__ == "__main__":
    main()
