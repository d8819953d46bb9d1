"""Inference speed: nm.segment with rwkv_unet_t against a plain 4-level U-Net forward.

    python bench/infer.py [--threads 2] [--size 512] [--repeats 5]

The baseline is the classic U-Net (double 3x3 conv + BN + ReLU, 32-64-128-256
channels, 1.9M parameters), a bare eval-mode forward under inference_mode --
what any tool would run.  Ours is the whole user-facing call, ``segment`` on a
uint8 RGB image (normalisation, fused BatchNorm, thresholding included).
"""
import argparse

import numpy as np
import torch
import torch.nn as nn
from timing import median_seconds

import napari_medrwkv as nm


def double_conv(c_in, c_out):
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
                         nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class PlainUNet(nn.Module):
    def __init__(self, widths=(32, 64, 128, 256), in_chans=3, num_classes=1):
        super().__init__()
        self.down = nn.ModuleList()
        c = in_chans
        for w in widths:
            self.down.append(double_conv(c, w))
            c = w
        self.up = nn.ModuleList(nn.ConvTranspose2d(w, w // 2, 2, stride=2) for w in reversed(widths[1:]))
        self.merge = nn.ModuleList(double_conv(w, w // 2) for w in reversed(widths[1:]))
        self.head = nn.Conv2d(widths[0], num_classes, 1)

    def forward(self, x):
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else nn.functional.max_pool2d(x, 2))
            skips.append(x)
        for up, merge, skip in zip(self.up, self.merge, reversed(skips[:-1])):
            x = merge(torch.cat([up(x), skip], 1))
        return self.head(x)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--models", nargs="*", default=["rwkv_unet_t", "ds_vrwkv_t", "med_urwkv_t"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    unet = PlainUNet().eval()
    x = torch.randn(1, 3, args.size, args.size)
    with torch.inference_mode():
        baseline = median_seconds(lambda: unet(x), args.repeats)
    image = np.random.default_rng(0).integers(0, 256, (args.size, args.size, 3), dtype=np.uint8)
    print(f"{args.size}x{args.size} RGB, CPU {args.threads} threads, median of {args.repeats}")
    print(f"{'model':>14} | {'params (M)':>10} | {'seconds':>7} | {'vs U-Net':>8}")
    params = sum(p.numel() for p in unet.parameters()) / 1e6
    print(f"{'plain U-Net':>14} | {params:10.2f} | {baseline:7.3f} | {1.0:7.2f}x")
    for name in args.models:
        model = nm.load_model(name, device="cpu")
        seconds = median_seconds(lambda: nm.segment(image, model=model, tile=args.size), args.repeats)
        params = sum(p.numel() for p in model.net.parameters()) / 1e6
        print(f"{name:>14} | {params:10.2f} | {seconds:7.3f} | {seconds / baseline:7.2f}x")


if __name__ == "__main__":
    main()
