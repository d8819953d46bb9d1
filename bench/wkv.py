"""Bi-WKV on the GPU: the CUDA kernel against the memory floor and the PyTorch path.

    python bench/wkv.py [--repeats 50]

Prints a markdown table of median milliseconds (CUDA events, after warm-up) on the
GPU that is present: forward under inference_mode and forward+backward, float32
unless marked bf16.  The floor is the time the bytes a pass must move take at the
device's measured copy bandwidth: k, v read and y written for the forward; k, v, gy
read and gk, gv written for the backward.  The PyTorch path is bi_wkv_chunked.
"""
import argparse
import statistics
import sys
from datetime import date

import torch

from napari_medrwkv.ops.bi_wkv import bi_wkv_chunked
from napari_medrwkv.ops.bi_wkv import cuda as wkv_cuda

SHAPES = [(16, 1024, 288), (16, 256, 560), (1, 4096, 288), (1, 16384, 288), (32, 196, 192), (8, 16384, 512)]
BF16_SHAPE = (8, 16384, 512)
FORWARD_TENSORS = 3    # k, v in; y out
BACKWARD_TENSORS = 5   # k, v, gy in; gk, gv out


def median_ms(fn, repeats: int) -> float:
    """Median of ``repeats`` timed calls, each between two CUDA events, after three untimed ones."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def copy_bandwidth(repeats: int) -> float:
    """Bytes per second of a device-to-device copy of 512 MiB (read + write)."""
    src = torch.empty(2 ** 27, device="cuda")
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), repeats)
    return 2 * src.numel() * src.element_size() / (ms * 1e-3)


def inputs(B, T, C, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    # Decays as the models pass them: spatial_decay in [-5, 3] divided by T.
    w = (torch.rand(C, generator=g) * 8 - 5) / T
    u = torch.randn(C, generator=g) / T
    k, v = torch.randn(B, T, C, generator=g), torch.randn(B, T, C, generator=g)
    return [w.cuda(), u.cuda(), k.to("cuda", dtype), v.to("cuda", dtype)]


def forward_ms(fn, args, repeats):
    with torch.inference_mode():
        return median_ms(lambda: fn(*args), repeats)


def train_ms(fn, args, repeats):
    leaves = [a.clone().requires_grad_() for a in args]
    gy = torch.randn_like(args[2])
    return median_ms(lambda: torch.autograd.grad(fn(*leaves), leaves, gy), repeats)


def floor_ms(shape, tensors, element_size, bandwidth):
    B, T, C = shape
    return tensors * B * T * C * element_size / bandwidth * 1e3


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/wkv.py times the CUDA kernel and needs a CUDA GPU; torch.cuda.is_available() is False here.")
    reason = wkv_cuda.unavailable_reason()
    if reason:
        sys.exit(f"The CUDA Bi-WKV kernel is unavailable: {reason}")
    bandwidth = copy_bandwidth(args.repeats)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}, {date.today()}; "
          f"copy bandwidth {bandwidth / 1e9:.0f} GB/s; median ms of {args.repeats}")
    print()
    print("| B, T, C | floor fwd | kernel fwd | torch fwd | floor f+b | kernel f+b | torch f+b "
          "| kernel bf16 fwd | kernel bf16 f+b |")
    print("|---|---|---|---|---|---|---|---|---|")
    for shape in SHAPES:
        x = inputs(*shape)
        floor_f = floor_ms(shape, FORWARD_TENSORS, 4, bandwidth)
        floor_b = floor_f + floor_ms(shape, BACKWARD_TENSORS, 4, bandwidth)
        ours = forward_ms(wkv_cuda.bi_wkv_cuda, x, args.repeats), train_ms(wkv_cuda.bi_wkv_cuda, x, args.repeats)
        torch_path = forward_ms(bi_wkv_chunked, x, args.repeats), train_ms(bi_wkv_chunked, x, args.repeats)
        bf16 = "— | —"
        if shape == BF16_SHAPE:
            xb = inputs(*shape, dtype=torch.bfloat16)
            bf16 = (f"{forward_ms(wkv_cuda.bi_wkv_cuda, xb, args.repeats):.3f} | "
                    f"{train_ms(wkv_cuda.bi_wkv_cuda, xb, args.repeats):.3f}")
        print(f"| {', '.join(map(str, shape))} | {floor_f:.3f} | {ours[0]:.3f} | {torch_path[0]:.3f} "
              f"| {floor_b:.3f} | {ours[1]:.3f} | {torch_path[1]:.3f} | {bf16} |")
        del x
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
