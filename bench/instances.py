"""Instance post-processing speed at 1024x1024, beside the whole segment call.

    python bench/instances.py [--model CHECKPOINT] [--threads 2] [--repeats 5]

Two 1024x1024 images: the 1024² image of the DSB2018 test split with the most nuclei (read from
``../shared/data/dsb2018``, or skipped when absent) and the 256² fluorescence sample tiled 4x4
(about 1600 nuclei, many touching).  Per image: ``post-processing`` is
``instances.plane_instances`` on the stitched probabilities (foreground + border, computed
once), ``connected components`` the floor's labelling of the foreground mask, and ``segment``
the whole user-facing ``nm.segment`` call with the instance model (network, tiling, stitching,
post-processing).  ``--model`` defaults to the shipped nuclei model, made an instance model when
it is not one (its border channel then says "no border": the timing is the same, the labels
are not those of a trained instance model).
"""
import argparse
import json
from pathlib import Path

import numpy as np
import torch
from timing import interleaved_median_seconds

import napari_medrwkv as nm
from napari_medrwkv.engine.imageio import read_image
from napari_medrwkv.engine.infer import _predict
from napari_medrwkv.engine.instances import connected_objects, plane_instances
from napari_medrwkv.engine.model import load_model, with_instances
from napari_medrwkv.engine.preprocess import image_to_channels

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "dsb2018"


def images():
    sample = read_image(ROOT / "napari_medrwkv" / "plugin" / "samples" / "nuclei_fluorescence.png")
    found = [("fluorescence sample tiled 4x4", np.tile(sample, (4, 4, 1)))]
    if (DATA / "splits.json").is_file():
        from napari_medrwkv.engine.instances import read_instances
        best = None
        for stem in json.loads((DATA / "splits.json").read_text())["test"]:
            mask = read_instances(next((DATA / "masks").glob(stem + ".*")))
            if mask.shape == (1024, 1024) and (best is None or mask.max() > best[1]):
                best = (stem, int(mask.max()))
        if best is not None:
            image = read_image(next((DATA / "images").glob(best[0] + ".*")))
            found.insert(0, (f"DSB2018 test {best[0]} ({best[1]} nuclei)", image))
    return found


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="rwkv_unet_t-dsb2018")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(args.model, device="cpu")
    model = model if model.info.instances else with_instances(model)
    print(f"model {args.model} (instances={model.info.instances}), {args.threads} threads, median of {args.repeats}")
    print("| image | objects | post-processing (s) | connected components (s) | segment, whole call (s) |")
    print("|---|---|---|---|---|")
    for name, image in images():
        x = image_to_channels(image, model.info.in_chans)
        probs = _predict(model, x, model.info.inference["flips"])          # the stitched planes, whole
        labels = plane_instances(probs, kind=model.info.instances)
        times = interleaved_median_seconds({
            "post": lambda: plane_instances(probs, kind=model.info.instances),
            "cc": lambda: connected_objects(probs[0] > 0.5),
            "segment": lambda: nm.segment(image, model=model),
        }, rounds=args.repeats)
        print(f"| {name} | {int(labels.max())} | {times['post']:.3f} | {times['cc']:.3f} | {times['segment']:.2f} |")


if __name__ == "__main__":
    main()
