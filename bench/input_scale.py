"""Dice of a checkpoint when its network sees the images at other sizes (weights unchanged).

    python bench/input_scale.py --model M --data DIR [--split val] [--include 'benign_*,malignant_*']
                                --scales 0.5,0.75,1.0 [--threads 2]

Only the checkpoint's ``input_scale`` changes between rows, so the table says whether a model
would do better on larger or smaller images than it was trained on -- a question to settle
on ``val`` before spending hours training at another scale.  Each row is scored with and
without test-time flips.
"""
import argparse

import torch

import napari_medrwkv as nm


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="shipped name or checkpoint path")
    parser.add_argument("--data", required=True, help="dataset folder")
    parser.add_argument("--split", default="val")
    parser.add_argument("--include", help="comma-separated stem patterns, as `medrwkv evaluate --include`")
    parser.add_argument("--scales", required=True, help="comma-separated input scales")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    include = args.include.split(",") if args.include else None
    model = nm.load_model(args.model, device="cpu")
    print(f"{args.model} (trained at input scale {model.info.input_scale}), {args.split} split, "
          f"CPU {args.threads} threads")
    print(f"{'scale':>8} | {'n':>4} | {'Dice':>6} | {'IoU':>6} | {'Dice, flips':>11}")
    for scale in (float(s) for s in args.scales.split(",")):
        model.info.input_scale = scale
        plain, flipped = (nm.evaluate(model, args.data, split=args.split, include=include, flips=flips)
                          for flips in (False, True))
        print(f"{scale:>8g} | {plain['n']:>4} | {plain['dice']:6.4f} | {plain['iou']:6.4f} | {flipped['dice']:11.4f}",
              flush=True)


if __name__ == "__main__":
    main()
