"""What keeping freed memory (engine/memory.py) buys: nm.segment with malloc as glibc sets it and as we set it.

    python bench/memory.py [--threads 2] [--sizes 512 1024] [--repeats 5] [--rounds 3] [--model rwkv_unet_t-dsb2018]

The setting is process-wide, so each case runs in a fresh Python process: load the
model, segment a uint8 RGB image of each size twice untimed, then ``--repeats`` timed
calls, on the main thread or on a worker thread (the widgets run there).  The two
settings' processes alternate for ``--rounds`` rounds, so that a machine whose speed
drifts hits both alike; printed: the median over rounds of each process's median
milliseconds, and minor page faults (one 4 KiB page mapped afresh) per call.
MEDRWKV_RETAIN_MEMORY=0 is malloc as glibc sets it.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys

CASE = """
import json, resource, statistics, sys, threading, time
import numpy as np, torch
import napari_medrwkv as nm
from napari_medrwkv.engine.memory import retain_freed_memory
threads, sizes, repeats, name, on_worker = json.loads(sys.argv[1])
torch.set_num_threads(threads)
model = nm.load_model(name, device="cpu")
rows = []
def work():
    for size in sizes:
        image = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
        for _ in range(2):
            nm.segment(image, model=model)
        times, faults = [], []
        for _ in range(repeats):
            before, start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
            nm.segment(image, model=model)
            times.append(time.perf_counter() - start)
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        rows.append([size, statistics.median(times), statistics.median(faults)])
if on_worker:
    worker = threading.Thread(target=work)
    worker.start()
    worker.join()
else:
    work()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"retained": retain_freed_memory(), "rows": rows, "peak_mb": peak}))
"""


def run_case(args, retain: bool, on_worker: bool):
    env = dict(os.environ, MEDRWKV_RETAIN_MEMORY="1" if retain else "0")
    payload = json.dumps([args.threads, args.sizes, args.repeats, args.model, on_worker])
    run = subprocess.run([sys.executable, "-c", CASE, payload], capture_output=True, text=True, env=env, check=True)
    return json.loads(run.stdout.splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--model", default="rwkv_unet_t-dsb2018")
    args = parser.parse_args()
    print(f"nm.segment, {args.model}, {args.threads} threads, median of {args.rounds} processes x {args.repeats} calls")
    print("| thread | size | glibc default ms | faults/call | kept ms | faults/call | time saved | peak RSS MB default / kept |")
    print("|---|---|---|---|---|---|---|---|")
    for on_worker in (False, True):
        runs = {False: [], True: []}
        for _ in range(args.rounds):
            for retain in (False, True):
                runs[retain].append(run_case(args, retain, on_worker))
        if not runs[True][0]["retained"]:
            print("(this C library is not glibc: the setting does not apply, nothing to compare)")
            return
        default, kept = (_summary(runs[retain]) for retain in (False, True))
        for (size, t0, f0, peak0), (_, t1, f1, peak1) in zip(default, kept):
            print(f"| {'worker' if on_worker else 'main'} | {size}² | {t0 * 1e3:.0f} | {f0:.0f} | {t1 * 1e3:.0f} | "
                  f"{f1:.0f} | {1 - t1 / t0:.0%} | {peak0:.0f} / {peak1:.0f} |")


def _summary(runs):
    """Per size: median seconds and faults over the processes, and their largest peak memory."""
    peak = max(run["peak_mb"] for run in runs)
    per_size = zip(*(run["rows"] for run in runs))
    return [(rows[0][0], statistics.median(r[1] for r in rows), statistics.median(r[2] for r in rows), peak)
            for rows in per_size]


if __name__ == "__main__":
    main()
