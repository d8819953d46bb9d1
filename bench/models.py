"""Every registered model: parameters, FLOPs and CPU forward time at 512x512.

    python bench/models.py [--threads 2] [--size 512] [--repeats 3] [--models rwkv_unet_t ...]

FLOPs are 2 x multiply-adds (bench/flops.py: matmul/conv counted by PyTorch,
Bi-WKV analytically).  Time is the median eval-mode forward of a (1, 3, size,
size) input under inference_mode, with the chunked PyTorch Bi-WKV path.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from flops import count_flops  # noqa: E402
from timing import median_seconds  # noqa: E402

from napari_medrwkv.models import create_model, list_models  # noqa: E402


def forward_ms(model, size, repeats):
    x = torch.randn(1, 3, size, size)
    with torch.inference_mode():
        return median_seconds(lambda: model(x), repeats) * 1e3


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--models", nargs="*", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    names = args.models or list_models()
    print(f"models at {args.size}x{args.size}, RGB, 1 class; CPU {args.threads} threads, median of {args.repeats}")
    print(f"{'model':>14} | {'params (M)':>10} | {'GFLOPs':>8} | {'forward (ms)':>12}")
    for name in names:
        torch.manual_seed(0)
        model = create_model(name).eval()
        params = sum(p.numel() for p in model.parameters()) / 1e6
        gflops = count_flops(model, (1, 3, args.size, args.size)) / 1e9
        print(f"{name:>14} | {params:10.2f} | {gflops:8.2f} | {forward_ms(model, args.size, args.repeats):12.0f}", flush=True)


if __name__ == "__main__":
    main()
