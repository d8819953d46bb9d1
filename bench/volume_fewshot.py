"""Few-shot on a scan: a tumour labelled on three slices, fine-tuned for a few CPU minutes, scored on the rest.

    python bench/volume_fewshot.py --scan ../shared/data/volumes/brain1_image.nrrd \
        --label ../shared/data/volumes/brain1_label.nrrd --base rwkv_unet_t-busi rwkv_unet_t-kvasir --minutes 3

The scan is read as napari and ``medrwkv segment`` read it (engine/scans.py) and cut into the
planes the scanner acquired.  Three of the slices holding the tumour (spread evenly over it) play
the slices a user corrected and marked reviewed; the model is fine-tuned on them as the Fine-tune
widget does (its few-shot settings; of three reviewed slices one is held out to pick the kept
weights) for at most ``--minutes`` on ``--threads`` CPU threads.  Dice is then measured on the
other tumour slices, pooled over their voxels and as the mean over slices, beside the same for
the model as it starts (no fine-tuning), and the voxels called tumour on the slices without any.
Prints one row per base model.
"""
import argparse
import os
import time

import numpy as np
import torch

import napari_medrwkv as nm
from napari_medrwkv.engine.scans import read_scan


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    total = int(pred.sum()) + int(truth.sum())
    return 2.0 * int(np.logical_and(pred, truth).sum()) / total if total else 1.0


def scores(model, planes, truth, scored, empty):
    labels = nm.segment(planes, model=model) > 0
    pooled = dice(labels[scored], truth[scored])
    per_slice = float(np.mean([dice(labels[z], truth[z]) for z in scored]))
    return pooled, per_slice, int(labels[empty].sum())


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scan", required=True)
    parser.add_argument("--label", required=True)
    parser.add_argument("--base", nargs="+", default=["rwkv_unet_t-busi"])
    parser.add_argument("--minutes", type=float, default=3.0)
    parser.add_argument("--shots", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--empty", type=int, default=0,
                        help="also review this many slices without tumour (empty labels), spread over them")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    scan, label = read_scan(args.scan), read_scan(args.label)
    axis = scan.geometry.slice_axis
    planes = np.moveaxis(scan.array, axis, 0)
    truth = np.moveaxis(label.array, axis, 0) > 0
    tumour = [int(z) for z in np.flatnonzero(truth.any(axis=(1, 2)))]
    shots = [tumour[int(round(i))] for i in np.linspace(0, len(tumour) - 1, args.shots)]
    scored = [z for z in tumour if z not in shots]
    empty = [z for z in range(len(planes)) if z not in tumour]
    if args.empty:
        reviewed_empty = [empty[int(round(i))] for i in np.linspace(0, len(empty) - 1, args.empty + 2)[1:-1]]
        shots = sorted(shots + reviewed_empty)
        empty = [z for z in empty if z not in reviewed_empty]
    # As the Fine-tune widget splits reviewed slices: a fifth (at least one) held out, seeded.
    order = np.random.default_rng(0).permutation(len(shots))
    held = sorted(shots[int(i)] for i in order[:max(1, int(round(0.2 * len(shots))))])
    trained = [z for z in shots if z not in held]
    print(f"{args.scan}: {planes.shape[0]} slices of {planes.shape[1]}x{planes.shape[2]} (axis {axis}), tumour on "
          f"{tumour}; reviewed {shots} (trained on {trained}, held out {held}); scored on {scored}; "
          f"{args.threads} threads, load average {os.getloadavg()[0]:.2f} at the start")
    print(f"{'base':>20} | {'state':>10} | {'minutes':>7} | {'epochs':>6} | {'kept':>4} | {'Dice (voxels)':>13} | "
          f"{'Dice (slices)':>13} | {'false voxels':>12}")
    for base in args.base:
        model = nm.load_model(base, device="cpu")
        pooled, per_slice, false = scores(model, planes, truth, scored, empty)
        print(f"{base:>20} | {'start':>10} | {0:7.1f} | {0:6d} | {'-':>4} | {pooled:13.3f} | {per_slice:13.3f} | "
              f"{false:12d}", flush=True)
        config = nm.TrainConfig.few_shot(seed=0)
        start = time.monotonic()
        result = nm.train(model, [(planes[z], truth[z].astype(np.uint8)) for z in trained], max_minutes=args.minutes,
                          device="cpu", val_data=[(planes[z], truth[z].astype(np.uint8)) for z in held],
                          config=config)
        minutes = (time.monotonic() - start) / 60
        pooled, per_slice, false = scores(result.model, planes, truth, scored, empty)
        print(f"{base:>20} | {'fine-tuned':>10} | {minutes:7.1f} | {len(result.history):6d} | {result.best_epoch:4d} | "
              f"{pooled:13.3f} | {per_slice:13.3f} | {false:12d}", flush=True)
    print(f"load average {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
