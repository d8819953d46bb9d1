"""An instance model's post-processing block by block (engine/block_instances.py) against the whole plane.

    python bench/block_instances.py [--side 2048] [--blocks 512 1024] [--threads 1] [--repeats 3]

The shipped nuclei model made a "distance" instance model predicts the fluorescence sample
tiled 4x4 (1024², about 1600 nuclei) once; its two probability planes, tiled up to ``--side``,
are post-processed (1) whole, by ``instances.plane_instances``, and (2) block by block from a
float32 zarr store as the block path keeps them: components labelled per block, joined across
faces, each post-processed alone.  Writing the store (done by the blocks as they finish) is
timed apart.  "same objects" checks that both give one partition of pixels (ids one to one).
"""
import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import zarr

from napari_medrwkv.engine.block_instances import plane_instances_by_blocks
from napari_medrwkv.engine.blocks import _grid
from napari_medrwkv.engine.imageio import read_image
from napari_medrwkv.engine.infer import _predict
from napari_medrwkv.engine.instances import plane_instances
from napari_medrwkv.engine.model import load_model, with_instances
from napari_medrwkv.engine.preprocess import image_to_channels

ROOT = Path(__file__).resolve().parents[1]


def same_objects(a: np.ndarray, b: np.ndarray) -> bool:
    a, b = a.astype(np.int64), b.astype(np.int64)
    if not np.array_equal(a > 0, b > 0):
        return False
    pairs = np.unique(np.stack([a[a > 0], b[b > 0]]), axis=1)
    return pairs.shape[1] == len(np.unique(pairs[0])) == len(np.unique(pairs[1]))


def best_of(fn, repeats: int):
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", type=int, default=2048)
    parser.add_argument("--blocks", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = with_instances(load_model("rwkv_unet_t-dsb2018", device="cpu"), "distance")
    sample = read_image(ROOT / "napari_medrwkv" / "plugin" / "samples" / "nuclei_fluorescence.png")
    probs = _predict(model, image_to_channels(np.tile(sample, (4, 4, 1)), model.info.in_chans), False)
    reps = -(-args.side // probs.shape[1])
    probs = np.ascontiguousarray(np.tile(probs, (1, reps, reps))[:, :args.side, :args.side])
    seconds, whole = best_of(lambda: plane_instances(probs, kind="distance"), args.repeats)
    print(f"{args.side}² probabilities, {int(whole.max())} objects, {args.threads} thread(s), best of {args.repeats}")
    print("| post-processing | seconds | writing the store (s) | same objects |")
    print("|---|---|---|---|")
    print(f"| whole plane in memory | {seconds:.2f} | - | - |")
    for block in args.blocks:
        folder = Path(tempfile.mkdtemp(prefix="bench-block-instances-"))
        try:
            store = zarr.open_array(str(folder / "p.zarr"), mode="w", shape=probs.shape, chunks=(1, block, block),
                                    dtype=np.float32)
            start = time.perf_counter()
            for rows, cols in _grid(probs.shape[1:], block):
                store[:, rows, cols] = probs[:, rows, cols]
            written = time.perf_counter() - start
            labels = zarr.open_array(str(folder / "l.zarr"), mode="w", shape=probs.shape[1:], chunks=(block, block),
                                     dtype=np.uint32)
            blocks = list(_grid(probs.shape[1:], block))
            seconds, _ = best_of(lambda: plane_instances_by_blocks(store, labels, None, blocks, "distance", 0.5,
                                                                   False, 1 << 31), args.repeats)
            same = same_objects(np.asarray(labels), whole)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        print(f"| blocks of {block} from a zarr store | {seconds:.2f} | {written:.2f} | {'yes' if same else 'NO'} |")


if __name__ == "__main__":
    main()
