"""Which-model suggestion: how often it names the model trained on an image's own data set.

    python bench/suggest.py [--data ../shared/data] [--rescale 2] [--step 3]

For every image of the val and test splits of the three shipped models' data sets (every
``--step``-th), the shipped model ``suggest_model`` names (or none), and the time it takes per
image.  ``--rescale F`` resizes each image by F first: a user's images need not have the
resolution of the training images (a 1920 x 1080 colonoscopy frame, a 40x slide).
"""
import argparse
import collections
import time
from pathlib import Path

from skimage.transform import rescale

from napari_medrwkv.engine.appearance import suggest_model
from napari_medrwkv.engine.datasets import find_pairs
from napari_medrwkv.engine.imageio import read_image

TRAINED_ON = {"kvasir-seg": "rwkv_unet_t-kvasir", "busi": "rwkv_unet_t-busi", "dsb2018": "rwkv_unet_t-dsb2018"}


def _read(path, factor: float):
    image = read_image(path)
    if factor == 1:
        return image
    resized = rescale(image, factor, channel_axis=-1 if image.ndim == 3 else None, preserve_range=True,
                      anti_aliasing=factor < 1)
    return resized.astype(image.dtype)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    parser.add_argument("--rescale", type=float, default=1.0)
    parser.add_argument("--step", type=int, default=1)
    args = parser.parse_args()
    print("| data set | split | images | right | other picks | ms per image |")
    print("|---|---|---|---|---|---|")
    for folder, model in TRAINED_ON.items():
        for split in ("val", "test"):
            pairs = find_pairs(Path(args.data) / folder, split)[::args.step]
            start = time.perf_counter()
            picks = collections.Counter(getattr(suggest_model(_read(p.image, args.rescale)), "source", None)
                                        for p in pairs)
            ms = (time.perf_counter() - start) / len(pairs) * 1e3
            others = ", ".join(f"{name or 'none'} {n}" for name, n in picks.items() if name != model) or "-"
            print(f"| {folder} | {split} | {len(pairs)} | {picks[model]} | {others} | {ms:.0f} |")


if __name__ == "__main__":
    main()
