"""Which-model suggestion: how often it names the model trained on an image's own data set.

    python bench/suggest.py [--data ../shared/data]

For every image of the val and test splits of the three shipped models' data sets, the
shipped model ``suggest_model`` names (or none), and the time it takes per image.
"""
import argparse
import collections
import time
from pathlib import Path

from napari_medrwkv.engine.appearance import suggest_model
from napari_medrwkv.engine.data import find_pairs, read_image

TRAINED_ON = {"kvasir-seg": "rwkv_unet_t-kvasir", "busi": "rwkv_unet_t-busi", "dsb2018": "rwkv_unet_t-dsb2018"}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    args = parser.parse_args()
    print("| data set | split | images | right | other picks | ms per image |")
    print("|---|---|---|---|---|---|")
    for folder, model in TRAINED_ON.items():
        for split in ("val", "test"):
            pairs = find_pairs(Path(args.data) / folder, split)
            start = time.perf_counter()
            picks = collections.Counter(getattr(suggest_model(read_image(p.image)), "source", None) for p in pairs)
            ms = (time.perf_counter() - start) / len(pairs) * 1e3
            others = ", ".join(f"{name or 'none'} {n}" for name, n in picks.items() if name != model) or "-"
            print(f"| {folder} | {split} | {len(pairs)} | {picks[model]} | {others} | {ms:.0f} |")


if __name__ == "__main__":
    main()
