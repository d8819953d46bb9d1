"""Memory of segmenting a stack: nm.segment on (Z, Y, X), with and without its probabilities.

    python bench/stack.py [--model rwkv_unet_t-dsb2018] [--classes 1] [--depth 16] [--size 768] [--threads 2]

Each case runs in a fresh Python process (peak resident memory only ever grows): load the
model, segment one 64² image (the network's own buffers), then the uint8 grey stack once.
Printed: seconds, the peak resident memory the stack call added over the model's
(``ru_maxrss``), and the size of what it returned.  ``--classes`` applies to an
architecture name (an untrained model: the memory, not the answer, is measured).
"""
import argparse
import json
import subprocess
import sys

CASE = """
import json, resource, sys, time
import numpy as np, torch
import napari_medrwkv as nm
name, classes, depth, size, threads, probabilities = json.loads(sys.argv[1])
torch.set_num_threads(threads)
model = nm.load_model(name, device="cpu", **({"num_classes": classes} if classes else {}))
nm.segment(np.zeros((64, 64), np.uint8), model=model)
stack = np.random.default_rng(0).integers(0, 256, (depth, size, size), dtype=np.uint8)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
out = nm.segment(stack, model=model, return_probabilities=probabilities)
seconds = time.perf_counter() - start
added = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
returned = sum(a.nbytes for a in out) if probabilities else out.nbytes
print(json.dumps({"seconds": seconds, "added_mb": added, "returned_mb": returned / 2**20}))
"""


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="rwkv_unet_t-dsb2018")
    parser.add_argument("--classes", type=int, default=0, help="classes of an architecture name (0: the model's)")
    parser.add_argument("--depth", type=int, default=16)
    parser.add_argument("--size", type=int, default=768)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    print(f"nm.segment of a ({args.depth}, {args.size}, {args.size}) uint8 stack, {args.model}"
          f"{f', {args.classes} classes' if args.classes else ''}, {args.threads} threads, a fresh process per row")
    print("| returns | seconds | peak memory added (MB) | returned (MB) |")
    print("|---|---|---|---|")
    for probabilities in (False, True):
        payload = json.dumps([args.model, args.classes, args.depth, args.size, args.threads, probabilities])
        run = subprocess.run([sys.executable, "-c", CASE, payload], capture_output=True, text=True, check=True)
        row = json.loads(run.stdout.splitlines()[-1])
        what = "labels and probabilities" if probabilities else "labels"
        print(f"| {what} | {row['seconds']:.1f} | {row['added_mb']:.0f} | {row['returned_mb']:.0f} |")


if __name__ == "__main__":
    main()
