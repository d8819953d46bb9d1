"""docs/docked-1080.png and docs/correct.png: the widgets docked in a real window, on the
fluorescence sample segmented with the model suggested for it.

    xvfb-run -a -s "-screen 0 1920x1080x24" .venv/bin/python docs/make_docked_figure.py docs

docked-1080.png: Segment, Correct and Fine-tune docked below each other (napari's default) in a
1920x1080 window; correct.png: Segment and Correct in a 1400x850 window, the Delete-object mode on
and the result marked reviewed.  About a minute on two cores.
"""
import sys
import time
from pathlib import Path

import napari
from napari._qt.dialogs.qt_notification import NapariQtNotification
from qtpy.QtWidgets import QApplication

PLUGIN = "napari-medrwkv"


def settle(condition=lambda: True, timeout=300):
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        QApplication.processEvents()
        time.sleep(0.05)
    for _ in range(30):
        QApplication.processEvents()
        time.sleep(0.02)
    assert condition(), "timed out"


def shot(viewer, path):
    for toast in viewer.window._qt_window.findChildren(NapariQtNotification):   # napari's PyQt5 notice
        toast.close()
    settle()
    viewer.screenshot(str(path), canvas_only=False)
    print("saved", path)


def segmented(size, names):
    viewer = napari.Viewer(title="MedRWKV")
    viewer.open_sample(PLUGIN, "fluorescence")
    viewer.layers[-1].visible = False                # the ground truth
    widgets = [viewer.window.add_plugin_dock_widget(PLUGIN, name)[1] for name in names]
    window = viewer.window._qt_window
    window.showNormal()
    window.resize(*size)
    settle()
    segment, correct = widgets[0], widgets[1]
    segment.image_combo.setCurrentText("nuclei fluorescence")
    segment.run()
    settle(lambda: segment.worker is None)
    print("segment:", segment.status.text())
    correct.mark_reviewed(True)
    viewer.reset_view()
    return viewer, widgets


def main(folder: Path):
    viewer, _ = segmented((1920, 1080), ("Segment", "Correct", "Fine-tune"))
    shot(viewer, folder / "docked-1080.png")
    viewer.close()
    viewer, (_, correct) = segmented((1400, 850), ("Segment", "Correct"))
    correct.delete_button.click()
    shot(viewer, folder / "correct.png")
    viewer.close()


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "docs"))
