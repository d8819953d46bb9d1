"""Which-model suggestion: how often it names the model trained on an image's own data set, and
whether it knows when it does not know.

    python bench/suggest.py [--data ../shared/data] [--rescale 2] [--step 3]
    python bench/suggest.py --held-out [--draws 4]

For every image of the val and test splits of the three shipped models' data sets (every
``--step``-th), the shipped model ``suggest_model`` names (or none), and the time it takes per
image.  ``--rescale F`` resizes each image by F first: a user's images need not have the
resolution of the training images (a 1920 x 1080 colonoscopy frame, a 40x slide).

``--held-out`` plays a kind of image no shipped model was trained on: each set in turn is left
out with its model.  (1) For its val and test images, how often one of the other two models is
proposed anyway (it should say none fits).  (2) As after fine-tuning on five of its training
images (``--draws`` seeded draws of five): how often that fine-tuned model's profile is suggested
for its test images, and how often it is suggested for the other sets' test images instead of
their own model.  (3) The same five images as a fine-tuning of the set's own model, with that
model among the candidates: how often the fine-tuned one is suggested for the set's test images.
"""
import argparse
import collections
import time
from pathlib import Path

import numpy as np
from skimage.transform import rescale

from napari_medrwkv.engine.appearance import appearance, appearance_profile, profile_of, suggest_from_profiles, \
    suggest_model
from napari_medrwkv.engine.datasets import find_pairs
from napari_medrwkv.engine.imageio import read_image
from napari_medrwkv.engine.model import read_model_info

TRAINED_ON = {"kvasir-seg": "rwkv_unet_t-kvasir", "busi": "rwkv_unet_t-busi", "dsb2018": "rwkv_unet_t-dsb2018"}
FINE_TUNED = "fine-tuned"


def _read(path, factor: float):
    image = read_image(path)
    if factor == 1:
        return image
    resized = rescale(image, factor, channel_axis=-1 if image.ndim == 3 else None, preserve_range=True,
                      anti_aliasing=factor < 1)
    return resized.astype(image.dtype)


def held_out(data: Path, draws: int) -> None:
    profiles = {model: profile_of(read_model_info(model)) for model in TRAINED_ON.values()}
    features = {folder: [appearance(read_image(p.image)) for split in ("val", "test")
                         for p in find_pairs(data / folder, split)] for folder in TRAINED_ON}
    tests = {folder: [appearance(read_image(p.image)) for p in find_pairs(data / folder, "test")]
             for folder in TRAINED_ON}
    print("| left out | val+test images | another model proposed | fine-tuned on 5 of its images: suggested for "
          "its test images | suggested for other sets' test images | fine-tuned from its own model: suggested "
          "over it |")
    print("|---|---|---|---|---|---|")
    for folder, model in TRAINED_ON.items():
        others = {m: p for m, p in profiles.items() if m != model}
        proposed = sum(suggest_from_profiles(f, others) is not None for f in features[folder])
        train = find_pairs(data / folder, "train")
        won, stolen, stolen_of, over_own = 0, 0, 0, 0
        for draw in range(draws):
            chosen = np.random.default_rng(draw).choice(len(train), 5, replace=False)
            tuned = appearance_profile(read_image(train[i].image) for i in chosen)
            candidates = dict(others, **{FINE_TUNED: tuned})
            won += sum(getattr(suggest_from_profiles(f, candidates), "source", None) == FINE_TUNED
                       for f in tests[folder])
            for other_folder, other_model in TRAINED_ON.items():
                if other_folder != folder:
                    everyone = dict(profiles, **{FINE_TUNED: tuned})
                    stolen += sum(getattr(suggest_from_profiles(f, everyone), "source", None) == FINE_TUNED
                                  for f in tests[other_folder])
                    stolen_of += len(tests[other_folder])
            everyone = dict(profiles, **{FINE_TUNED: tuned})
            over_own += sum(getattr(suggest_from_profiles(f, everyone, {FINE_TUNED: model}), "source", None)
                            == FINE_TUNED for f in tests[folder])
        n_test = len(tests[folder]) * draws
        print(f"| {folder} | {len(features[folder])} | {proposed} ({proposed / len(features[folder]):.0%}) | "
              f"{won} of {n_test} ({won / n_test:.0%}) | {stolen} of {stolen_of} ({stolen / stolen_of:.1%}) | "
              f"{over_own} of {n_test} ({over_own / n_test:.0%}) |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    parser.add_argument("--rescale", type=float, default=1.0)
    parser.add_argument("--step", type=int, default=1)
    parser.add_argument("--held-out", action="store_true", help="leave each set and its model out in turn")
    parser.add_argument("--draws", type=int, default=4, help="with --held-out: draws of five fine-tuning images")
    args = parser.parse_args()
    if args.held_out:
        held_out(Path(args.data), args.draws)
        return
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
