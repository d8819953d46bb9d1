"""Makes docs/finetune.png: the whole loop in a real napari window on six DSB2018 bright-field slides.

Segment (shipped polyp model, which finds nothing on them) -> slides 0-4 corrected (their
ground truth) and marked reviewed -> Fine-tune with the widget's defaults (3 min) ->
Re-segment the unreviewed slide 5 -> screenshot with slide 5 shown.
From the repository root, with ../shared/data beside it (about four minutes on two cores):

    xvfb-run -a -s "-screen 0 1400x850x24" .venv/bin/python docs/make_finetune_figure.py docs/finetune.png

The Re-segment prompt is answered Yes by the script; the fine-tuned model goes to a temporary folder.
"""
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from napari_medrwkv.engine.memory import retain_freed_memory

retain_freed_memory()
import napari  # noqa: E402
from napari._qt.dialogs.qt_notification import NapariQtNotification  # noqa: E402
from qtpy.QtWidgets import QApplication, QMessageBox  # noqa: E402

from napari_medrwkv.plugin import review  # noqa: E402
from napari_medrwkv.engine.imageio import read_image, read_mask  # noqa: E402
from napari_medrwkv.engine.metrics import dice  # noqa: E402

DATA = Path("../shared/data/dsb2018")
BASE = "rwkv_unet_t-kvasir"
stems = json.loads(Path("bench/splits/dsb2018-slides.json").read_text())["train"][:6]
images = np.stack([read_image(DATA / "images" / f"{s}.png") for s in stems])
truth = np.stack([read_mask(DATA / "masks" / f"{s}.png", 1) for s in stems])


def wait(cond, timeout=900):
    deadline = time.monotonic() + timeout
    while not cond() and time.monotonic() < deadline:
        QApplication.processEvents()
        time.sleep(0.05)
    for _ in range(20):
        QApplication.processEvents()
        time.sleep(0.02)
    assert cond(), "timed out"


viewer = napari.Viewer(title="MedRWKV")
viewer.window._qt_window.resize(1400, 850)
viewer.add_image(images, name="bright-field slides", rgb=True)
_, seg = viewer.window.add_plugin_dock_widget("napari-medrwkv", "Segment")
seg.image_combo.setCurrentText("bright-field slides")
seg.model_combo.setCurrentText(BASE)
seg.scope_combo.setCurrentText("all slices")
seg.probability_check.setChecked(False)
seg.run()
wait(lambda: seg.worker is None)
print("segment:", seg.status.text())
labels = viewer.layers[f"bright-field slides [{BASE}]"]
for i in range(5):                 # the user's corrections of slides 0-4
    labels.data[i] = truth[i]
    review.set_reviewed(labels, i)
labels.refresh()
_, tune = viewer.window.add_plugin_dock_widget("napari-medrwkv", "Fine-tune", tabify=True)
tune.refresh_pairs()
tune.model_combo.setCurrentText(BASE)
tune.device_combo.setCurrentText("cpu")
out = Path(tempfile.mkdtemp()) / "brightfield-finetuned.safetensors"
tune.output_edit.setText(str(out))
t0 = time.monotonic()
tune.run()
wait(lambda: tune.worker is None)
print(f"fine-tune ({(time.monotonic() - t0) / 60:.1f} min):", tune.status.text(), "|", tune.result_label.text())
QMessageBox.question = lambda *a, **k: QMessageBox.StandardButton.Yes     # the re-segment prompt, answered Yes
tune.resegment()
wait(lambda: tune.worker is None)
print("resegment:", tune.status.text())
viewer.dims.set_current_step(0, 5)
labels.opacity = 0.6
print(f"slide 5 Dice {dice(labels.data[5], truth[5]):.3f}")
for toast in viewer.window._qt_window.findChildren(NapariQtNotification):   # napari's PyQt5 notice
    toast.close()
wait(lambda: True)
viewer.screenshot(sys.argv[1], canvas_only=False)
print("saved", sys.argv[1])
