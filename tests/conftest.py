import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "napari_medrwkv" / "plugin" / "samples"
SHARED_DATA = ROOT.parent / "shared" / "data"
# What MedRWKV remembers between napari sessions (plugin/reader_preference.py) stays out of the home folder.
os.environ.setdefault("MEDRWKV_CONFIG_DIR", tempfile.mkdtemp(prefix="medrwkv-config-"))
# Subprocesses (the CLI, npe2, launch) print UTF-8 (✔, ², …) and the tests read it as UTF-8,
# whatever locale the machine runs the suite under.
os.environ["PYTHONUTF8"] = "1"


@pytest.fixture(autouse=True)
def fresh_model_lists():
    """Each test starts with the model lists of a fresh napari session: a test that fine-tunes
    registers its model in every widget's list, where a later test would find it selected."""
    yield
    session = sys.modules.get("napari_medrwkv.plugin.session")
    if session is not None:
        session.clear()


@pytest.fixture
def sample_folder(tmp_path):
    """A dataset folder (images/ + masks/) of the two bundled CC0 nuclei samples."""
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    for name in ("nuclei_fluorescence", "nuclei_brightfield"):
        shutil.copy(SAMPLES / f"{name}.png", tmp_path / "images" / f"{name}.png")
        shutil.copy(SAMPLES / f"{name}_mask.png", tmp_path / "masks" / f"{name}.png")
    return tmp_path


@pytest.fixture
def shared_data():
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA} (a fresh clone has none; CI has ../shared)")
    return SHARED_DATA


@pytest.fixture
def sample_arrays():
    from napari_medrwkv.engine.imageio import read_image, read_mask
    return [(read_image(SAMPLES / f"{n}.png"), read_mask(SAMPLES / f"{n}_mask.png", 1))
            for n in ("nuclei_fluorescence", "nuclei_brightfield")]


def random_image(shape, dtype=np.uint8, seed=0):
    rng = np.random.default_rng(seed)
    if np.issubdtype(dtype, np.integer):
        return rng.integers(0, np.iinfo(dtype).max, shape, dtype=dtype)
    return rng.random(shape).astype(dtype)


def tiny_finetune(viewer, qtbot, base, out, batch_size=2):
    """The Fine-tune widget docked in ``viewer`` and run on its reviewed pairs from ``base`` into
    ``out``: one epoch of two 64-pixel patches on the CPU.  Returns the widget once it is done."""
    from napari_medrwkv.plugin.finetune_widget import FineTuneWidget
    finetune = FineTuneWidget(viewer)
    viewer.window.add_dock_widget(finetune)
    finetune.refresh_pairs()
    finetune.add_model_source(base)
    finetune.epochs_spin.setValue(1)
    finetune.patch_spin.setValue(64)
    finetune.batch_spin.setValue(batch_size)
    finetune.samples_spin.setValue(2)
    finetune.device_combo.setCurrentText("cpu")
    finetune.output_edit.setText(str(out))
    finetune.run()
    qtbot.waitUntil(lambda: finetune.worker is None, timeout=180000)
    return finetune


def untrained_checkpoint(path, num_classes=1):
    """A real checkpoint file of the fastest architecture, untrained (seeded), for widget tests."""
    import torch
    from napari_medrwkv.engine.checkpoint import ModelInfo, save_checkpoint
    from napari_medrwkv.engine.preprocess import NORMALIZATION
    from napari_medrwkv.models import create_model
    torch.manual_seed(0)
    info = ModelInfo("ds_vrwkv_t", 3, num_classes, normalization=dict(NORMALIZATION), tile_size=256)
    save_checkpoint(create_model("ds_vrwkv_t", num_classes=num_classes), path, info)
    return str(path)


@pytest.fixture
def places_that_vanish(tmp_path, monkeypatch):
    """(output folder, vanish): a folder to save into, and a function that removes it together with
    every place finished weights could be rescued to (the temporary, home and working folders)."""
    import shutil
    import tempfile
    usb, gone = tmp_path / "usb", tmp_path / "gone"
    for folder in (usb, gone):
        folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(gone / "tmp"))
    monkeypatch.setenv("HOME", str(gone / "home"))
    monkeypatch.chdir(gone)

    def vanish(*_):
        for folder in (usb, gone):
            shutil.rmtree(folder, ignore_errors=True)
    return usb, vanish
