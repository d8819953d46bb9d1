"""Images larger than memory, Dask workers and torchrun: the targets of the scale-out work.

    python bench/scale.py rss  [--sides 2048 16384] [--block 2048] [--tile 512] [--model rwkv_unet_t-dsb2018]
    python bench/scale.py dask [--side 4096] [--block 2048] [--tile 512] [--workers 1 2]
    python bench/scale.py ddp  [--procs 1 2] [--samples 64] [--epochs 1]

rss: an RGB zarr image of each side (the bundled fluorescence sample tiled over it, chunks of
1024) is segmented into a zarr store, each in a fresh process that reports its own peak RSS
(ru_maxrss) and the megapixels per second; target: the largest side's peak at most 1.25x the
smallest's.  dask: one image segmented in memory in one pass, then block by block on a
LocalCluster of each number of workers (one thread each); printed: megapixels per second and
how many pixels differ from the one pass (target: 0; 2 workers at least 1.6x one on a machine
with two free cores).  ddp: ``torchrun --standalone --nproc_per_node N`` trains the same model
on the bundled samples (gloo, CPU, one thread per process); printed: training samples per
second over all processes, and whether the ranks held the same weights after every step.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "napari_medrwkv" / "plugin" / "samples" / "nuclei_fluorescence.png"

RSS_CASE = r"""
import json, resource, sys, time
import numpy as np
import napari_medrwkv as nm
store, out, block, name, tile = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
model = nm.load_model(name, device="cpu")
nm.segment(np.zeros((600, 600, 3), np.uint8), model, tile=tile)     # the network's own memory, warm
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
labels = nm.segment(store, model, tile=tile, block=block, out=out)
seconds = time.perf_counter() - start
print(json.dumps({"peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "warm_mb": before / 1024, "seconds": seconds, "pixels": labels.shape[0] * labels.shape[1]}))
"""


def make_zarr(path: Path, side: int, chunk: int = 1024):
    import zarr
    from napari_medrwkv.engine.imageio import read_image
    tile = read_image(SAMPLE)[..., :3]
    reps = (-(-chunk // tile.shape[0]), -(-chunk // tile.shape[1]), 1)
    block = np.tile(tile, reps)[:chunk, :chunk]
    array = zarr.open_array(str(path), mode="w", shape=(side, side, 3), chunks=(chunk, chunk, 3), dtype=np.uint8)
    for r in range(0, side, chunk):
        for c in range(0, side, chunk):
            # each chunk a different flip of the sample, so that no two neighbours repeat
            k = (r // chunk + 2 * (c // chunk)) % 4
            array[r:r + chunk, c:c + chunk] = np.rot90(block, k)[:side - r, :side - c]
    return array


def rss(args):
    rows = []
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        for side in args.sides:
            store = Path(tmp) / f"image{side}.zarr"
            make_zarr(store, side)
            run = subprocess.run([sys.executable, "-c", RSS_CASE, str(store), str(Path(tmp) / f"labels{side}.zarr"),
                                  str(args.block), args.model, str(args.tile)], capture_output=True, text=True,
                                 env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
            if run.returncode:
                sys.exit(run.stderr[-3000:])
            row = json.loads(run.stdout.strip().splitlines()[-1])
            rows.append((side, row))
            shutil.rmtree(store)
            print(f"{side}: {row}", file=sys.stderr, flush=True)
    base = rows[0][1]["peak_mb"]
    print("| side | peak RSS (MB) | after loading and warming the model (MB) | x smallest | MP/s |")
    print("|---|---|---|---|---|")
    for side, row in rows:
        print(f"| {side:,}² | {row['peak_mb']:.0f} | {row['warm_mb']:.0f} | {row['peak_mb'] / base:.2f} | "
              f"{row['pixels'] / row['seconds'] / 1e6:.3f} |")


def dask(args):
    import distributed
    import napari_medrwkv as nm
    model = nm.load_model(args.model, device="cpu")
    rows = []
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        store = Path(tmp) / "image.zarr"
        image = np.asarray(make_zarr(store, args.side))
        start = time.perf_counter()
        whole = nm.segment(image, model, tile=args.tile)
        rows.append(("one pass in memory", time.perf_counter() - start, 0))
        del image
        for n in args.workers:
            with distributed.LocalCluster(n_workers=n, threads_per_worker=1, processes=True,
                                          dashboard_address=None) as cluster, distributed.Client(cluster) as client:
                client.run(lambda: __import__("torch").set_num_threads(1))
                start = time.perf_counter()
                labels = nm.segment(store, model, tile=args.tile, block=args.block, client=client,
                                    out=Path(tmp) / f"labels{n}.zarr")
                rows.append((f"{n} Dask worker(s), blocks of {args.block}", time.perf_counter() - start,
                             int((np.asarray(labels) != whole).sum())))
            print(rows[-1], file=sys.stderr, flush=True)
    megapixels = args.side * args.side / 1e6
    print("| run | seconds | MP/s | pixels differing from the one pass |")
    print("|---|---|---|---|")
    for name, seconds, differ in rows:
        print(f"| {name} | {seconds:.1f} | {megapixels / seconds:.3f} | {differ} |")


DDP_CASE = r"""
import json, os, sys, time
import napari_medrwkv as nm
from napari_medrwkv.engine.train import TrainConfig
data, samples, epochs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
times = []
def progress(p):
    if p.epoch > 0 and p.val_dice is None:
        times.append(time.perf_counter())
cfg = TrainConfig(batch_size=4, patch_size=256, samples_per_epoch=samples, num_workers=0)
result = nm.train("rwkv_unet_t", data, epochs=epochs, device="cpu", progress=progress, config=cfg)
if int(os.environ.get("RANK", "0")) == 0:
    steps = len(times) - 1              # from the end of the first step: no start-up, no first-step warm-up
    world = int(os.environ.get("WORLD_SIZE", "1"))
    print(json.dumps({"samples_per_s": steps * cfg.batch_size * world / (times[-1] - times[0]),
                      "steps": len(times), "world": world}))
"""


def ddp(args):
    torchrun = Path(sys.executable).with_name("torchrun")
    rows = []
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        data = Path(tmp) / "data"
        for sub in ("images", "masks"):
            (data / sub).mkdir(parents=True)
        for name in ("nuclei_fluorescence", "nuclei_brightfield"):
            for copy in range(4):
                shutil.copy(SAMPLE.with_name(f"{name}.png"), data / "images" / f"{name}{copy}.png")
                shutil.copy(SAMPLE.with_name(f"{name}_mask.png"), data / "masks" / f"{name}{copy}.png")
        for n in args.procs:
            run = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", str(n), "--no-python",
                                  sys.executable, "-c", DDP_CASE, str(data), str(args.samples), str(args.epochs)],
                                 capture_output=True, text=True, cwd=tmp,
                                 env={**os.environ, "OMP_NUM_THREADS": "1", "MEDRWKV_DDP_CHECK": "1"})
            if run.returncode:
                sys.exit(run.stderr[-3000:])
            row = json.loads(run.stdout.strip().splitlines()[-1])
            checked = run.stdout.count("ranks hold the same weights")
            rows.append((n, row, checked))
            print(rows[-1], file=sys.stderr, flush=True)
    print("| processes | training samples/s (all processes) | steps per process | steps checked equal on all ranks |")
    print("|---|---|---|---|")
    for n, row, checked in rows:
        print(f"| {n} | {row['samples_per_s']:.2f} | {row['steps']} | {checked if n > 1 else 'n/a'} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("case", choices=("rss", "dask", "ddp"))
    parser.add_argument("--model", default="rwkv_unet_t-dsb2018")
    parser.add_argument("--sides", type=int, nargs="+", default=[2048, 16384])
    parser.add_argument("--side", type=int, default=4096)
    parser.add_argument("--block", type=int, default=2048)
    parser.add_argument("--tile", type=int, default=512, help="the network's tile side (default 512)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tmp", default=None, help="folder for the generated zarr images (default: the system's)")
    args = parser.parse_args()
    {"rss": rss, "dask": dask, "ddp": ddp}[args.case](args)


if __name__ == "__main__":
    main()
