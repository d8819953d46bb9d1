"""Freed memory kept for reuse: a repeated segmentation maps no new memory (glibc's malloc)."""
import json
import os
import subprocess
import sys

import pytest

from napari_medrwkv.engine import memory

glibc_only = pytest.mark.skipif(memory._glibc() is None, reason="the settings apply to glibc's malloc only")

# In a fresh process, as an application would: load a model, then segment five times on a
# worker thread (as the widgets do) and count each call's page faults.  The first call sets up
# the heap; the second, and now and then the third, still grows it by 16-48 MiB (seen here and
# on CI); after that the memory is reused.
_SCRIPT = """
import json, resource, threading
import numpy as np, torch
import napari_medrwkv as nm
from napari_medrwkv.engine.memory import retain_freed_memory
torch.set_num_threads(1)
model = nm.load_model("rwkv_unet_t", device="cpu")
image = np.random.default_rng(0).integers(0, 256, (512, 512, 3), dtype=np.uint8)
faults = []
def work():
    for _ in range(5):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        nm.segment(image, model=model)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
thread = threading.Thread(target=work)
thread.start()
thread.join()
print(json.dumps({"retained": retain_freed_memory(), "faults": faults}))
"""


def _faults_per_call(retain: str):
    env = dict(os.environ, MEDRWKV_RETAIN_MEMORY=retain, OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, encoding="utf-8", env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout.splitlines()[-1])


@glibc_only
def test_a_repeated_segmentation_on_a_worker_thread_reuses_the_memory_it_freed():
    kept = _faults_per_call("1")
    assert kept["retained"] is True
    # 4 KiB pages: the ~300 MB a 512x512 call maps afresh is ~50,000-90,000 faults; calls 3-5
    # together map less than a sixth of one such call.
    assert sum(kept["faults"][2:]) < 12_000, kept
    returned = _faults_per_call("0")              # malloc as glibc sets it: every call maps afresh
    assert returned["retained"] is False and min(returned["faults"][2:]) > 20_000, returned


def test_switched_off_by_the_environment(monkeypatch):
    monkeypatch.setenv(memory.RETAIN_ENV, "0")
    assert memory._apply() is False
