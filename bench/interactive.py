"""Click to fix, measured: clicks a simulated user needs, and how long one click takes.

    python bench/interactive.py [--model rwkv_unet_t-interactive] [--sets kvasir-seg busi dsb2018]
                                [--max-clicks 20] [--nuclei 300] [--limit N] [--threads 2]

The user is RITM's clicker (engine.interactive.next_click, threshold 0.5): each click goes to the
farthest point of the larger error region, through ``nm.refine``. Objects: every test image of
Kvasir-SEG, BUSI's benign and malignant test images, and ``--nuclei`` nuclei of the DSB2018 test
images, each its own object, taken from every image in turn; with ``--sets volumes``, the labelled
objects of the MRI scans in ``volumes/`` plane by plane (a kind of image the model never saw; from
nothing only). Two starts: from nothing, and from the automatic model's mask (its connected parts
that overlap the object). Reported per set and start: NoC@85 and NoC@90 (clicks until IoU reaches
0.85 / 0.90; an object that never does counts ``--max-clicks``), the share of objects never reaching
0.90, mean IoU after clicks 1, 2, 3, 5, 10 and 20; then the latency of one click (median and 95th
percentile over every refine call) beside a plain 4-level U-Net's 512x512 forward, timed in the same
run.
"""
import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

from infer import PlainUNet  # noqa: E402

from napari_medrwkv.engine import interactive  # noqa: E402
from napari_medrwkv.engine.datasets import find_pairs  # noqa: E402
from napari_medrwkv.engine.imageio import read_image  # noqa: E402
from napari_medrwkv.engine.infer import segment  # noqa: E402
from napari_medrwkv.engine.interactive_train import object_labels  # noqa: E402
from napari_medrwkv.engine.model import load_model  # noqa: E402

AUTOMATIC = {"kvasir-seg": "rwkv_unet_t-kvasir", "busi": "rwkv_unet_t-busi", "dsb2018": "rwkv_unet_t-dsb2018"}
CURVE_AT = (1, 2, 3, 5, 10, 20)


#: Scans no model here was trained on (the held-out kind): their labelled objects, plane by plane.
HELD_OUT = "volumes"
#: Objects smaller than this (pixels of one plane) are left out of the held-out set: slivers where
#: a tumour begins or ends, which no user would click.
MIN_PLANE_AREA = 30


def scan_objects(folder: Path, limit):
    """(plane, target mask, name) of each labelled object in each acquired plane of the scans
    ``folder/*_image.nrrd`` with ``*_label.nrrd``: MRI, which the prompt-aware model never saw."""
    from napari_medrwkv.engine.scans import read_scan
    found = []
    for image_path in sorted(folder.glob("*_image.nrrd")):
        image = read_scan(image_path)
        labels = read_scan(image_path.with_name(image_path.name.replace("_image", "_label"))).array
        axis = image.geometry.slice_axis
        planes, label_planes = np.moveaxis(image.array, axis, 0), np.moveaxis(labels, axis, 0)
        for z, (plane, label_plane) in enumerate(zip(planes, label_planes)):
            objects, count = object_labels(label_plane)
            for label in range(1, count + 1):
                target = objects == label
                if target.sum() >= MIN_PLANE_AREA:
                    found.append((plane, target, f"{image_path.name}[{z}]"))
    return found[:limit] if limit else found


def objects_of(data: Path, name: str, nuclei: int, limit):
    """(image, target mask, stem) of the test objects of one set."""
    if name == HELD_OUT:
        return scan_objects(data / name, limit)
    if name == "dsb2018":
        return nuclei_of(data / name, min(nuclei, limit or nuclei))
    found = []
    for pair in find_pairs(data / name, "test"):
        if name == "busi" and not pair.stem.startswith(("benign_", "malignant_")):
            continue
        image = read_image(pair.image)
        objects, count = object_labels(read_image(pair.mask))
        for label in range(1, count + 1):
            found.append((image, objects == label, pair.stem))
        if limit and len(found) >= limit:
            return found[:limit]
    return found


def nuclei_of(folder: Path, count: int, seed: int = 0):
    """``count`` nuclei spread over every test image: one at a time from each image in turn, each
    image's nuclei in a seeded random order.  (The first nuclei in file order come from two or
    three images, one kind of stain; a user's images are of many kinds.)"""
    images = []
    rng = np.random.default_rng(seed)
    for pair in find_pairs(folder, "test"):
        objects, found = object_labels(read_image(pair.mask))
        images.append((read_image(pair.image), objects, list(rng.permutation(np.arange(1, found + 1))), pair.stem))
    chosen = []
    while len(chosen) < count and any(order for _, _, order, _ in images):
        for image, objects, order, stem in images:
            if order and len(chosen) < count:
                chosen.append((image, objects == int(order.pop()), stem))
    return chosen


def automatic_start(automatic, image, target, cache):
    """The automatic model's answer for this object: its connected parts that overlap it."""
    key = id(image)
    if key not in cache:                 # the images stay alive in the object list: ids stay theirs
        cache[key] = segment(image, model=automatic) > 0
    parts, _ = ndimage.label(cache[key], structure=np.ones((3, 3)))
    touching = np.unique(parts[target & (parts > 0)])
    return np.isin(parts, touching[touching > 0])


def click_run(model, image, target, start, max_clicks, timings):
    """IoU after each click (``max_clicks`` values)."""
    prediction = start.copy()
    points, curve = [], []
    for _ in range(max_clicks):
        click = interactive.next_click(prediction, target)
        if click is None:
            curve.append(1.0)
            continue
        points.append(click)
        begun = time.perf_counter()
        try:
            prediction = interactive.refine(image, points=points, mask=prediction if prediction.any() else None,
                                            model=model)
        except ValueError:                           # only negative clicks so far
            prediction = np.zeros_like(target)
        timings.append(time.perf_counter() - begun)
        curve.append(interactive.iou(prediction, target))
    return curve


def noc(curve, level, max_clicks):
    return next((i + 1 for i, value in enumerate(curve) if value >= level), max_clicks)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=interactive.DEFAULT_MODEL)
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--sets", nargs="*", default=["kvasir-seg", "busi", "dsb2018"])
    parser.add_argument("--max-clicks", type=int, default=20)
    parser.add_argument("--nuclei", type=int, default=300)
    parser.add_argument("--limit", type=int, default=None, help="at most this many objects per set (a quick run)")
    parser.add_argument("--starts", nargs="*", default=["nothing", "automatic"])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(args.model, device="cpu")
    timings = []
    rows = []
    for name in args.sets:
        objects = objects_of(Path(args.data), name, args.nuclei, args.limit)
        automatic = load_model(AUTOMATIC[name], device="cpu") if name in AUTOMATIC else None
        cache = {}
        for start_kind in args.starts:
            if start_kind == "automatic" and automatic is None:     # no automatic model for this kind
                continue
            curves = []
            for image, target, _ in objects:
                start = np.zeros_like(target) if start_kind == "nothing" else \
                    automatic_start(automatic, image, target, cache)
                curves.append(click_run(model, image, target, start, args.max_clicks, timings))
            curves = np.asarray(curves)
            n85 = np.mean([noc(c, 0.85, args.max_clicks) for c in curves])
            n90 = np.mean([noc(c, 0.90, args.max_clicks) for c in curves])
            failed = np.mean([max(c) < 0.90 for c in curves])
            at = [f"{curves[:, k - 1].mean():.3f}" if k <= args.max_clicks else "-" for k in CURVE_AT]
            rows.append((name, start_kind, len(curves), f"{n85:.2f}", f"{n90:.2f}", f"{failed:.1%}", *at))
            print(" | ".join(str(v) for v in rows[-1]), flush=True)
    unet, x = PlainUNet().eval(), torch.rand(1, 3, 512, 512)
    with torch.inference_mode():
        unet(x)
        unet_times = []
        for _ in range(5):
            begun = time.perf_counter()
            unet(x)
            unet_times.append(time.perf_counter() - begun)
    print()
    print(f"model {args.model}, {args.threads} threads, {len(timings)} clicks")
    print("| set | start | objects | NoC@85 | NoC@90 | fail@90 | " + " | ".join(f"IoU@{k}" for k in CURVE_AT) + " |")
    print("|---" * (6 + len(CURVE_AT)) + "|")
    for row in rows:
        print("| " + " | ".join(str(v) for v in row) + " |")
    print()
    median, p95 = np.percentile(timings, [50, 95]) * 1000 if timings else (float("nan"),) * 2
    print("| one click, median | one click, p95 | plain U-Net 512² forward (median of 5) |")
    print("|---|---|---|")
    print(f"| {median:.0f} ms | {p95:.0f} ms | {np.median(unet_times) * 1000:.0f} ms |")


if __name__ == "__main__":
    main()
