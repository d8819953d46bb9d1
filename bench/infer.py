"""Inference speed: nm.segment with rwkv_unet_t against a plain 4-level U-Net forward.

    python bench/infer.py [--threads 2] [--size 512] [--repeats 5] [--models NAME ...] [--plain]
    python bench/infer.py --real-sizes [--model rwkv_unet_t-kvasir] [--threads 2]

``--real-sizes``: ``nm.segment`` with default settings (engine/tiling.py's policy) on RGB images
of 512², 1024², 2048², 4096² and 4000x3000 pixels, in seconds and megapixels per second, beside
the former default (512-pixel tiles overlapping by a quarter), one pass over the whole image where
the memory budget allows it, and Segment Anything's ViT-B image encoder (random weights; the
``bench`` extra installs ``segment-anything``) at 1024², all in one run.

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
    parser.add_argument("--real-sizes", action="store_true", help="the default tiling on image sizes users have")
    parser.add_argument("--model", default="rwkv_unet_t-kvasir", help="the model of --real-sizes")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.real_sizes:
        return real_sizes(args)
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


REAL_SIZES = ((512, 512), (1024, 1024), (2048, 2048), (4096, 4096), (3000, 4000))


def sam_vit_b_encoder():
    """Segment Anything's ViT-B image encoder (1024² input) with random weights, or None when
    ``segment-anything`` is not installed.  Only the encoder's modules are imported: the
    package's own ``__init__`` needs torchvision, which this project's torch build lacks."""
    import importlib.util
    import sys
    import types
    from functools import partial
    spec = importlib.util.find_spec("segment_anything")
    if spec is None:
        return None
    if "segment_anything" not in sys.modules:
        package = types.ModuleType("segment_anything")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["segment_anything"] = package
    from segment_anything.modeling.image_encoder import ImageEncoderViT
    return ImageEncoderViT(depth=12, embed_dim=768, img_size=1024, mlp_ratio=4, num_heads=12, patch_size=16,
                           qkv_bias=True, use_rel_pos=True, global_attn_indexes=(2, 5, 8, 11), window_size=14,
                           out_chans=256, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6)).eval()


def real_sizes(args):
    from timing import median_seconds
    from napari_medrwkv.engine.tiling import plan_tiles
    model = nm.load_model(args.model, device="cpu")
    memory = memory_setting()
    rng = np.random.default_rng(0)
    rows, per_pixel = [], {}
    for height, width in REAL_SIZES:
        image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        plan = plan_tiles((height, width), model.info.architecture)
        repeats = 3 if height * width <= 2048 ** 2 else 1
        auto = median_seconds(lambda: nm.segment(image, model=model), repeats)
        old = median_seconds(lambda: nm.segment(image, model=model, tile=512), repeats)
        one_pass = median_seconds(lambda: nm.segment(image, model=model, tile=max(height, width)), repeats) \
            if plan.count == 1 else None
        megapixels = height * width / 1e6
        per_pixel[(height, width)] = megapixels / auto
        rows.append((f"{height}×{width}", plan.reason, auto, megapixels / auto, old, megapixels / old, one_pass))
        print(rows[-1], flush=True)
    encoder = sam_vit_b_encoder()
    sam = None
    if encoder is not None:
        x = torch.randn(1, 3, 1024, 1024)
        with torch.inference_mode():
            sam = median_seconds(lambda: encoder(x), 3)
    base = per_pixel[(512, 512)]
    print(f"\n{args.model}, CPU {args.threads} threads, {memory}; random uint8 RGB images")
    print("| image | tiles (auto) | default s | MP/s | vs 512² MP/s | 512 tiles (before) s | MP/s | one pass s |")
    print("|---|---|---|---|---|---|---|---|")
    for size, reason, auto, mps, old, old_mps, one in rows:
        hw = tuple(int(v) for v in size.split("×"))
        one_text = f"{one:.2f}" if one is not None else "(tiled)"
        print(f"| {size} | {reason} | {auto:.2f} | {mps:.2f} | {per_pixel[hw] / base:.2f}× | {old:.2f} | "
              f"{old_mps:.2f} | {one_text} |")
    if sam is not None:
        at_1024 = rows[1][2]
        print(f"\nSegment Anything ViT-B image encoder, 1024² (random weights): {sam:.2f} s; "
              f"nm.segment at 1024² is {sam / at_1024:.1f}× faster")
    else:
        print("\nsegment-anything not installed (pip install -e '.[bench]'): ViT-B encoder not timed")


if __name__ == "__main__":
    main()
