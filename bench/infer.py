"""Inference speed: nm.segment with rwkv_unet_t against a plain 4-level U-Net forward.

    python bench/infer.py [--threads 2] [--size 512] [--repeats 5] [--models NAME ...] [--plain]

Each model segments with its own inference settings (a calibrated checkpoint may ask for
test-time flips: four passes); ``--plain`` times one pass, no flips, for every model.

The baseline is the classic U-Net (double 3x3 conv + BN + ReLU, 32-64-128-256
channels, 1.9M parameters), a bare eval-mode forward under inference_mode --
what any tool would run.  Ours is the whole user-facing call, ``segment`` on a
uint8 RGB image (normalisation, fused BatchNorm, thresholding included).  All are
timed in rounds that call each in turn, so the machine's drift hits them alike.

Loading a model keeps freed memory for reuse (engine/memory.py), for the whole process:
the U-Net runs with it too.  ``MEDRWKV_RETAIN_MEMORY=0`` runs all of them with malloc as
glibc sets it, as any other tool would run the U-Net.
"""
import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from timing import interleaved_median_seconds, memory_setting

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
    parser.add_argument("--plain", action="store_true", help="no test-time flips, whatever a checkpoint asks")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    unet = PlainUNet().eval()
    x = torch.randn(1, 3, args.size, args.size)
    image = np.random.default_rng(0).integers(0, 256, (args.size, args.size, 3), dtype=np.uint8)
    models = {name: nm.load_model(name, device="cpu") for name in args.models}

    def unet_forward():
        with torch.inference_mode():
            unet(x)
    calls = {"plain U-Net": unet_forward}
    flips = False if args.plain else None          # None: each model's own setting
    calls.update({name: (lambda m=m: nm.segment(image, model=m, tile=args.size, flips=flips))
                  for name, m in models.items()})
    seconds = interleaved_median_seconds(calls, args.repeats)
    baseline = seconds["plain U-Net"]
    memory = memory_setting()
    print(f"{args.size}x{args.size} RGB, CPU {args.threads} threads, {memory}, median of {args.repeats} interleaved rounds")
    print(f"{'model':>22} | {'params (M)':>10} | {'seconds':>7} | {'vs U-Net':>8} | flips")
    for name, net in [("plain U-Net", unet)] + [(name, m.net) for name, m in models.items()]:
        params = sum(p.numel() for p in net.parameters()) / 1e6
        label = Path(name).stem if name.endswith(".safetensors") else name
        flipped = "" if name not in models else "yes" if models[name].info.inference["flips"] and not args.plain else "no"
        print(f"{label:>22} | {params:10.2f} | {seconds[name]:7.3f} | {seconds[name] / baseline:7.2f}x | {flipped}")


if __name__ == "__main__":
    main()
