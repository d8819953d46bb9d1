"""Training on two processes with torchrun (gloo on the CPU): the same weights on both ranks after
every step, one checkpoint written by rank 0, loadable as a plain model."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

import napari_medrwkv as nm

from conftest import SAMPLES


def test_torchrun_two_processes_train_the_same_weights(tmp_path):
    data = tmp_path / "data"
    for sub in ("images", "masks"):
        (data / sub).mkdir(parents=True)
    for name in ("nuclei_fluorescence", "nuclei_brightfield"):
        for copy in range(3):
            shutil.copy(SAMPLES / f"{name}.png", data / "images" / f"{name}{copy}.png")
            shutil.copy(SAMPLES / f"{name}_mask.png", data / "masks" / f"{name}{copy}.png")
    torchrun = Path(sys.executable).with_name("torchrun")
    run = subprocess.run(
        [str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "napari_medrwkv", "train",
         "--model", "rwkv_unet_t", "--data", str(data), "--epochs", "1", "--batch-size", "2", "--patch-size", "64",
         "--samples-per-epoch", "8", "--out", str(tmp_path / "ddp.safetensors")],
        capture_output=True, text=True, encoding="utf-8", timeout=300, cwd=tmp_path,
        env={**os.environ, "MEDRWKV_DDP_CHECK": "1", "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    # 8 samples an epoch, 4 on each rank, batches of 2: two steps, each checked on both ranks.
    assert "step 2: 2 ranks hold the same weights" in run.stdout
    assert "step 3" not in run.stdout
    assert run.stdout.count("wrote ") == 1                 # rank 0 reports; rank 1 trains quietly
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "ddp.safetensors"]
    model = nm.load_model(str(tmp_path / "ddp.safetensors"), device="cpu")
    assert not any(k.startswith("module.") for k in model.net.state_dict())
    assert model.info.training["epochs"] == 1
    labels = nm.segment(np.zeros((40, 40, 3), np.uint8), model)
    assert labels.shape == (40, 40)
