"""The numbers behind engine/tiling.py, measured: memory per pixel of a forward pass, and how far
in from a tile's border its labels differ from a whole-plane pass.

    python bench/tile_policy.py --memory [--models ...]
    python bench/tile_policy.py --margin [--models ...] [--images 4] [--side 1024]
    python bench/tile_policy.py --batch [--models rwkv_unet_t-kvasir] [--threads 2]

--memory runs one forward pass per size in a fresh process and prints the growth of its peak
resident memory per input pixel (the figure ``BYTES_PER_PIXEL`` keeps per architecture).
--margin takes test images of each shipped model's data set, resized to ``--side``², runs them
whole, then runs one tile of half that side from the middle, and prints the share of pixels
whose label differs from the whole pass, by distance from the tile's border (network pixels):
the overlap the tiles need is the distance from which that share stays under 0.1%.
--batch times ``segment`` on a stack of eight 256² planes with one, two, four and eight planes
per batch (interleaved rounds), on the CPU: whether batching pays there.
"""
import argparse
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

SHIPPED_DATA = {"rwkv_unet_t-kvasir": "kvasir-seg", "rwkv_unet_t-dsb2018": "dsb2018", "rwkv_unet_t-busi": "busi"}
BANDS = (0, 8, 16, 32, 48, 64, 96, 128, 192, 256)

MEMORY_PROBE = """
import resource, sys, numpy as np, torch
torch.set_num_threads(1)
from napari_medrwkv.engine.infer import _predict
from napari_medrwkv.engine.model import load_model
model = load_model(sys.argv[1], device="cpu")
side = int(sys.argv[2])
x = np.random.default_rng(0).random((model.info.in_chans + model.info.prompt_channels, side, side), np.float32)
_predict(model, x[:, :64, :64], False)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
_predict(model, x, False)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024 / side ** 2)
"""


def memory(models, sides):
    print("| model | " + " | ".join(f"{s}² bytes/px" for s in sides) + " |")
    print("|---" * (len(sides) + 1) + "|")
    for name in models:
        cells = []
        for side in sides:
            out = subprocess.run([sys.executable, "-c", MEMORY_PROBE, name, str(side)], capture_output=True,
                                 text=True, check=True, env={"OMP_NUM_THREADS": "1", "PATH": ""}, cwd=ROOT)
            cells.append(f"{float(out.stdout.strip()):.0f}")
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


def margin(models, data: Path, images: int, side: int):
    import torch
    from PIL import Image
    from napari_medrwkv.engine.datasets import find_pairs
    from napari_medrwkv.engine.imageio import read_image
    from napari_medrwkv.engine.infer import _predict
    from napari_medrwkv.engine.model import load_model
    from napari_medrwkv.engine.preprocess import image_to_channels
    torch.set_num_threads(2)
    half, start = side // 2, side // 4
    print(f"| model | images | " + " | ".join(f"{a}-{b} px" for a, b in zip(BANDS, BANDS[1:])) + " |")
    print("|---" * (len(BANDS) + 1) + "|")
    rows, cols = np.mgrid[:half, :half]
    distance = np.minimum(np.minimum(rows, cols), np.minimum(half - 1 - rows, half - 1 - cols))
    for name in models:
        model = load_model(name, device="cpu")
        differ, counted = np.zeros(len(BANDS) - 1), np.zeros(len(BANDS) - 1)
        for pair in find_pairs(data / SHIPPED_DATA.get(name, "kvasir-seg"), "test")[:images]:
            image = read_image(pair.image)
            image = np.asarray(Image.fromarray(image).resize((side, side), Image.BILINEAR))
            x = image_to_channels(image, model.info.in_chans)
            whole = _predict(model, x, False)[0] > 0.5
            tile = _predict(model, np.ascontiguousarray(x[:, start:start + half, start:start + half]), False)[0] > 0.5
            wrong = tile != whole[start:start + half, start:start + half]
            for k, (a, b) in enumerate(zip(BANDS, BANDS[1:])):
                band = (distance >= a) & (distance < b)
                differ[k] += wrong[band].sum()
                counted[k] += band.sum()
        share = differ / np.maximum(counted, 1)
        print(f"| {name} | {images} | " + " | ".join(f"{v:.2%}" for v in share) + " |", flush=True)


def batching(models, threads: int):
    import torch
    from timing import interleaved_median_seconds
    from napari_medrwkv.engine import infer
    from napari_medrwkv.engine.model import load_model
    torch.set_num_threads(threads)
    stack = np.random.default_rng(0).integers(0, 256, (8, 256, 256, 3), dtype=np.uint8)
    real_batch_size = infer.batch_size
    for name in models:
        model = load_model(name, device="cpu")

        def run(size, model=model):
            infer.batch_size = lambda *args, **kwargs: size
            try:
                infer.segment(stack, model=model, rgb=True)
            finally:
                infer.batch_size = real_batch_size
        seconds = interleaved_median_seconds({size: (lambda size=size: run(size)) for size in (1, 2, 4, 8)}, 3)
        print(f"| {name}, {threads} threads | " + " | ".join(f"batch {k}: {v:.2f} s" for k, v in seconds.items())
              + " |", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--memory", action="store_true")
    parser.add_argument("--margin", action="store_true")
    parser.add_argument("--batch", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--models", nargs="*", default=list(SHIPPED_DATA))
    parser.add_argument("--sides", nargs="*", type=int, default=[256, 512, 1024])
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--side", type=int, default=1024)
    args = parser.parse_args()
    if args.memory:
        memory(args.models, args.sides)
    if args.margin:
        margin(args.models, Path(args.data), args.images, args.side)
    if args.batch:
        batching(args.models, args.threads)


if __name__ == "__main__":
    main()
