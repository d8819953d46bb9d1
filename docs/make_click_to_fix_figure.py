"""Makes docs/click-to-fix.png: the Click to fix widget docked on the fluorescence nuclei sample.

Two nuclei committed to a new labels layer, a third being clicked (two points inside, one
outside) and its preview shown.  The model is the shipped prompt-aware one when it is installed;
without it, the shipped nuclei model made prompt-aware by ``promptable_start``, whose prompt
inputs are untrained: it answers every nucleus of the window around the clicks, so nothing is
committed and the picture shows only the clicks, the preview and the widget.
From the repository root:

    xvfb-run -a -s "-screen 0 1400x850x24" .venv/bin/python docs/make_click_to_fix_figure.py docs/click-to-fix.png
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

import napari  # noqa: E402
from napari._qt.dialogs.qt_notification import NapariQtNotification  # noqa: E402
from qtpy.QtWidgets import QApplication  # noqa: E402

from napari_medrwkv.engine.interactive import DEFAULT_MODEL  # noqa: E402
from napari_medrwkv.engine.model import list_shipped  # noqa: E402


def wait(cond, timeout=300):
    deadline = time.monotonic() + timeout
    while not cond() and time.monotonic() < deadline:
        QApplication.processEvents()
        time.sleep(0.02)
    if not cond():
        sys.exit("timed out")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--model", default=None, help="a prompt-aware model (shipped name or checkpoint)")
    args = parser.parse_args()
    model = args.model
    if model is None and DEFAULT_MODEL in list_shipped():
        model = DEFAULT_MODEL
    commits = 2 if model is not None else 0
    if model is None:
        from napari_medrwkv.engine.checkpoint import save_checkpoint
        from napari_medrwkv.engine.interactive_train import promptable_start
        start = promptable_start("rwkv_unet_t-dsb2018")
        model = str(Path(tempfile.mkdtemp()) / "dsb2018-promptable-start.safetensors")
        save_checkpoint(start.net, model, start.info)
        print(f"{DEFAULT_MODEL} is not installed: using {model} (untrained prompt inputs)")

    viewer = napari.Viewer()
    viewer.window._qt_window.resize(1400, 850)
    viewer.open_sample("napari-medrwkv", "fluorescence")
    truth = viewer.layers["nuclei fluorescence ground truth"]
    truth.visible = False
    _, widget = viewer.window.add_plugin_dock_widget("napari-medrwkv", "Click to fix")
    if model in [widget.model_combo.itemText(i) for i in range(widget.model_combo.count())]:
        widget.model_combo.setCurrentText(model)
    else:
        widget.add_model_source(model)
    widget.image_combo.setCurrentText("nuclei fluorescence")
    widget.labels_combo.setCurrentText("New labels layer")
    assert widget.start(), widget.status.text()
    for _ in range(10):                       # the dock takes its room before the view is fitted
        QApplication.processEvents()
        time.sleep(0.05)
    viewer.reset_view()

    labels = np.asarray(truth.data)
    sizes = ndimage.sum_labels(np.ones_like(labels), labels, index=np.arange(1, labels.max() + 1))
    big = [i + 1 for i in np.flatnonzero(sizes >= np.median(sizes))]
    centres = [tuple(int(v) for v in ndimage.center_of_mass(labels == i)) for i in big]
    middle = np.array(labels.shape) / 2
    centres = sorted(centres, key=lambda c: np.hypot(*(np.array(c) - middle)))[:3]   # well inside the image
    idle = lambda: widget.worker is None and widget._pending is None and not widget._carries  # noqa: E731
    for centre in centres[:commits]:
        widget.add_point(centre, True)
        wait(idle)
        widget.commit()
        wait(idle)
    row, col = centres[2]
    widget.add_point((row, col), True)
    widget.add_point((row + 3, col - 2), True)
    widget.add_point((row - 14, col + 14), False)
    wait(idle)
    for _ in range(20):
        QApplication.processEvents()
        time.sleep(0.05)
    for toast in viewer.window._qt_window.findChildren(NapariQtNotification):   # napari's PyQt5 notice
        toast.close()
    QApplication.processEvents()
    viewer.screenshot(args.out, canvas_only=False)
    print(widget.status.text())
    print(f"wrote {args.out}")
    viewer.close()


if __name__ == "__main__":
    main()
