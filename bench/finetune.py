"""Few-shot fine-tuning: how much do a few corrected images and a few CPU minutes buy?

    python bench/finetune.py --base rwkv_unet_t-dsb2018 --data ../shared/data/busi --shots 10 \
        --minutes 3 --lr 1e-3 3e-4 --patch 128 256 --freeze none norm_stats encoder --augment-strength 0 1 2 --ema 0 0.9

For each setting: fine-tune the base model on ``--shots`` images drawn (seeded) from
the train split, validate on those same shots (or, with ``--hold-out 0.2``, on a fifth of
them held out of training, as the Fine-tune widget does), and report Dice on the ``val``
split before and after, the epoch kept (0: the starting weights) and its share of the kept
weights (blend: the rest is the start's).  Prints one row per setting.

Objects (nuclei, cells): ``--objects`` also scores object accuracy at IoU 0.5 and the DSB2018 score
before and after (a foreground model's objects are its connected components); ``--instances KIND``
trains the base into an instance model of that kind first (``TrainConfig.instances``), e.g.

    python bench/finetune.py --base rwkv_unet_t-kvasir --data ../shared/data/dsb2018 \
        --splits bench/splits/dsb2018-he.json --shots 5 --minutes 3 --lr 1e-3 --hold-out 0.2 \
        --objects --instances distance --score test
"""
import argparse
import itertools
import json
import time

import torch

import napari_medrwkv as nm
from napari_medrwkv.engine.datasets import find_pairs
from napari_medrwkv.engine.defaults import FEW_SHOT


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="shipped name or checkpoint")
    parser.add_argument("--data", required=True, help="dataset folder with splits.json")
    parser.add_argument("--shots", type=int, default=10)
    parser.add_argument("--minutes", type=float, default=3.0)
    parser.add_argument("--lr", type=float, nargs="+", default=[1e-3, 3e-4])
    parser.add_argument("--patch", type=int, nargs="+", default=[256])
    parser.add_argument("--freeze", nargs="+", default=["none"], help="TrainConfig.freeze settings to compare")
    parser.add_argument("--augment-strength", type=float, nargs="+", default=[1.0],
                        help="TrainConfig.augment_strength settings to compare (0 = flips and rotations only)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--val-limit", type=int, default=40, help="val images used for Dice (speed)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--exclude", default="normal_", help="skip stems starting with this (BUSI normals)")
    parser.add_argument("--splits", help="a splits.json to use instead of the dataset's own (e.g. one kind of image)")
    parser.add_argument("--foreground", type=float, nargs="+", default=[1 / 3],
                        help="TrainConfig.foreground settings to compare (fraction of crops on a foreground pixel)")
    parser.add_argument("--ema", type=float, nargs="+", default=[0.0],
                        help="TrainConfig.ema settings to compare (decay of the kept weight average; 0 = off)")
    parser.add_argument("--blend", type=float, nargs="+", default=[FEW_SHOT["blend"]],
                        help="TrainConfig.blend settings to compare (the best epoch's share of the kept weights)")
    parser.add_argument("--objects", action="store_true",
                        help="also score objects: accuracy at IoU 0.5 and the DSB2018 score (masks as instance labels)")
    parser.add_argument("--instances", default="", choices=["", "distance", "border"],
                        help="train the base into an instance model of this kind (implies --objects)")
    parser.add_argument("--score", default="val", help="the split scored before and after (val while choosing)")
    parser.add_argument("--hold-out", type=float, default=0.0,
                        help="validate on this fraction of the shots (at least one), trained on the rest, as the "
                             "Fine-tune widget does from three reviewed pairs (0.2); 0 = validate on the shots")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    def usable(pairs):
        return [p for p in pairs if not (args.exclude and p.stem.startswith(args.exclude))]

    if args.splits:
        with open(args.splits) as f:
            chosen = json.load(f)
        everything = {p.stem: p for p in find_pairs(args.data)}

        def split_pairs(name):
            return [everything[s] for s in chosen[name]]
    else:
        def split_pairs(name):
            return find_pairs(args.data, name)

    train_pool = usable(split_pairs("train"))
    shots = [train_pool[i] for i in torch.randperm(len(train_pool), generator=torch.Generator().manual_seed(args.seed))
             [:args.shots].tolist()]
    train_shots, val_shots = shots, shots
    if args.hold_out:
        n_held = max(1, int(round(args.hold_out * len(shots))))
        train_shots, val_shots = shots[n_held:], shots[:n_held]      # the draw is already seeded and shuffled
    val = usable(split_pairs(args.score))[:args.val_limit]
    objects = args.objects or bool(args.instances)
    base = nm.load_model(args.base, device="cpu")
    scored = _scores(base, val, objects)
    before = scored[0]
    print(f"base {args.base} on {args.data} {args.score} ({len(val)} images): " + _words(scored, objects))
    print(f"{'lr':>8} | {'patch':>5} | {'freeze':>10} | {'augment':>7} | {'fg':>4} | {'ema':>5} | {'shots':>5} | "
          f"{'minutes':>7} | {'epochs':>6} | {'kept':>4} | {'blend':>5} | {args.score + ' Dice':>8} | {'gain':>6}"
          + (" | acc@0.5 | gain | DSB | gain" if objects else ""))
    settings = itertools.product(args.lr, args.patch, args.freeze, args.augment_strength, args.foreground, args.ema,
                                 args.blend)
    for lr, patch, freeze, strength, foreground, ema, blend in settings:
        cfg = nm.TrainConfig(lr=lr, patch_size=patch, batch_size=args.batch, seed=args.seed, freeze=freeze,
                             augment_strength=strength, foreground=foreground, ema=ema, blend=blend,
                             samples_per_epoch=max(len(train_shots), 4 * args.batch), instances=args.instances)
        start = time.monotonic()
        result = nm.train(base, train_shots, max_minutes=args.minutes, device="cpu", val_data=val_shots, config=cfg)
        now = _scores(result.model, val, objects)
        after = now[0]
        extra = "".join(f" | {b:7.3f} | {b - a:+6.3f}" for a, b in zip(scored[1:], now[1:]))
        print(f"{lr:8.0e} | {patch:5d} | {freeze:>10} | {strength:7g} | {foreground:4.2f} | {ema:5g} | {len(shots):5d} | "
              f"{(time.monotonic() - start) / 60:7.1f} | {len(result.history):6d} | {result.best_epoch:4d} | "
              f"{result.blend:5.2f} | {after:8.4f} | {after - before:+6.3f}{extra}",
              flush=True)


def _scores(model, pairs, objects: bool):
    """(Dice,) or (Dice, object accuracy at IoU 0.5, DSB score), means over ``pairs``."""
    if not objects:
        return (nm.evaluate(model, pairs)["dice"],)
    scores = nm.evaluate(model, pairs, instances=True)
    return scores["dice"], scores["accuracy50"], scores["dsb"]


def _words(scores, objects: bool) -> str:
    text = f"Dice {scores[0]:.4f}"
    return text + (f", accuracy@0.5 {scores[1]:.3f}, DSB {scores[2]:.3f}" if objects else "")


if __name__ == "__main__":
    main()
