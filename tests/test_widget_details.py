"""What a new user tripped over in the widgets: keys, errors that stay, tiles, closed and renamed
images (pytest-qt under Xvfb, real key and mouse events)."""
import numpy as np
import pytest

from conftest import untrained_checkpoint

pytest.importorskip("napari")

from qtpy.QtCore import Qt  # noqa: E402
from qtpy.QtWidgets import QLabel  # noqa: E402

from napari_medrwkv.plugin import correct_widget, finetune_widget, review, segment_widget, session  # noqa: E402

PLUGIN = "napari-medrwkv"
GT = "nuclei fluorescence ground truth"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return untrained_checkpoint(tmp_path_factory.mktemp("ckpt") / "nuclei-test.safetensors")


@pytest.fixture(autouse=True)
def fresh_session():
    session.clear()
    yield
    session.clear()


@pytest.fixture
def errors(monkeypatch):
    seen = []
    for module in (segment_widget, correct_widget, finetune_widget):
        monkeypatch.setattr(module, "show_error", seen.append)
    return seen


@pytest.fixture
def docked(make_napari_viewer, checkpoint, qtbot):
    from qtpy.QtWidgets import QApplication
    viewer = make_napari_viewer(show=True)
    widgets = {name: viewer.window.add_plugin_dock_widget(PLUGIN, name)[1] for name in ("Segment", "Correct", "Fine-tune")}
    widgets["Segment"].add_model_source(checkpoint)
    window = viewer.window._qt_window
    window.activateWindow()                                  # keys go to the active window
    qtbot.waitUntil(lambda: QApplication.activeWindow() is window, timeout=5000)
    return viewer, widgets


def _wait(widget, qtbot):
    qtbot.waitUntil(lambda: widget.worker is None, timeout=120000)


def _legend(widget):
    return widget.findChild(QLabel, "medrwkv-keys").text()


def test_keyboard_shortcuts_work_from_the_canvas_and_are_shown(docked, qtbot, errors):
    viewer, widgets = docked
    segment, correct, finetune = widgets["Segment"], widgets["Correct"], widgets["Fine-tune"]
    assert "Shift+S" in _legend(segment) and "Shift+S" in segment.run_button.toolTip()
    assert "Shift+F" in _legend(correct) and "Shift+M" in correct.mark_button.toolTip()
    assert "Shift+T" in _legend(finetune)
    viewer.open_sample(PLUGIN, "fluorescence")
    canvas = viewer.window._qt_viewer.canvas.native
    canvas.setFocus()
    qtbot.keyClick(canvas, Qt.Key.Key_S, Qt.KeyboardModifier.ShiftModifier)        # Segment
    assert segment.worker is not None
    _wait(segment, qtbot)
    result = viewer.layers["nuclei fluorescence [nuclei-test]"]
    assert viewer.layers.selection.active is result and correct.labels_combo.currentText() == result.name
    canvas.setFocus()
    qtbot.keyClick(canvas, Qt.Key.Key_M, Qt.KeyboardModifier.ShiftModifier)        # Mark reviewed
    assert review.reviewed(result) == [0]
    assert finetune.pairs_label.text().startswith("Reviewed pairs: 1")              # counted without Refresh
    qtbot.keyClick(canvas, Qt.Key.Key_U, Qt.KeyboardModifier.ShiftModifier)        # Unmark
    assert review.reviewed(result) == [] and finetune.pairs_label.text().startswith("Reviewed pairs: 0")
    qtbot.keyClick(canvas, Qt.Key.Key_D, Qt.KeyboardModifier.ShiftModifier)        # Delete-object mode
    assert correct.delete_button.isChecked()
    qtbot.keyClick(canvas, Qt.Key.Key_D, Qt.KeyboardModifier.ShiftModifier)
    assert not correct.delete_button.isChecked()
    before = result.data.copy()
    qtbot.keyClick(canvas, Qt.Key.Key_B, Qt.KeyboardModifier.ShiftModifier)        # Smooth boundary
    assert correct.status.text().startswith("Smooth") and not errors, errors
    if not np.array_equal(before, result.data):
        result.undo()
        assert np.array_equal(before, result.data)


def test_errors_stay_in_the_status_line(docked, qtbot, errors):
    viewer, widgets = docked
    segment, correct, finetune = widgets["Segment"], widgets["Correct"], widgets["Fine-tune"]
    qtbot.mouseClick(segment.run_button, Qt.MouseButton.LeftButton)
    assert errors and "No image layer" in segment.status.text()
    qtbot.mouseClick(correct.fill_button, Qt.MouseButton.LeftButton)
    assert correct.status.text() == correct_widget.NO_LABELS
    qtbot.mouseClick(finetune.run_button, Qt.MouseButton.LeftButton)
    assert "Nothing to learn from" in finetune.status.text()
    assert len(errors) == 3                                  # and each a notification too


def test_a_tile_smaller_than_the_model_allows_is_refused(docked, qtbot, errors):
    viewer, widgets = docked
    segment = widgets["Segment"]
    viewer.add_image(np.random.default_rng(0).integers(0, 255, (96, 96), dtype=np.uint8), name="small")
    assert "tile" in segment.tile_spin.toolTip().lower()
    qtbot.mouseClick(segment.settings_section.toggle, Qt.MouseButton.LeftButton)
    segment.tile_spin.setFocus()
    segment.tile_spin.lineEdit().selectAll()
    qtbot.keyClicks(segment.tile_spin, "33")
    qtbot.keyClick(segment.tile_spin, Qt.Key.Key_Return)
    assert segment.tile_spin.value() == 33
    qtbot.mouseClick(segment.run_button, Qt.MouseButton.LeftButton)
    assert segment.worker is None and "small [nuclei-test]" not in viewer.layers
    assert "Tile 33 px is smaller than nuclei-test allows (64 px" in segment.status.text() and errors
    segment.tile_spin.lineEdit().selectAll()
    qtbot.keyClicks(segment.tile_spin, "64")
    qtbot.keyClick(segment.tile_spin, Qt.Key.Key_Return)
    qtbot.mouseClick(segment.run_button, Qt.MouseButton.LeftButton)
    _wait(segment, qtbot)
    assert "small [nuclei-test]" in viewer.layers, segment.status.text()


def test_closing_the_image_during_a_run_adds_no_result(docked, qtbot, errors):
    viewer, widgets = docked
    segment = widgets["Segment"]
    image = viewer.add_image(np.random.default_rng(0).integers(0, 255, (2048, 2048), dtype=np.uint8), name="big")
    segment.probability_check.setChecked(True)
    qtbot.mouseClick(segment.run_button, Qt.MouseButton.LeftButton)
    assert segment.worker is not None
    viewer.layers.selection.active = image
    qtbot.mouseClick(viewer.window._qt_viewer.layerButtons.deleteButton, Qt.MouseButton.LeftButton)   # the bin
    assert "big" not in viewer.layers
    _wait(segment, qtbot)
    assert not [layer.name for layer in viewer.layers if layer.name.startswith("big")]
    assert "was closed while it was being segmented" in segment.status.text()


def test_renaming_an_image_keeps_its_reviewed_pairs(docked, qtbot):
    viewer, widgets = docked
    correct, finetune = widgets["Correct"], widgets["Fine-tune"]
    image, truth = viewer.open_sample(PLUGIN, "fluorescence")
    review.link(truth, image.name)
    review.set_reviewed(truth, 0)
    qtbot.mouseClick(finetune.refresh_button, Qt.MouseButton.LeftButton)
    assert finetune.pairs_label.text().startswith("Reviewed pairs: 1")
    image.name = "renamed nuclei"                             # what editing the name in the layer list does
    assert review.linked_image(truth) == "renamed nuclei"
    qtbot.mouseClick(finetune.refresh_button, Qt.MouseButton.LeftButton)
    assert finetune.pairs_label.text().startswith("Reviewed pairs: 1")
    assert [pair.image_name for pair in review.reviewed_pairs(viewer.layers)] == ["renamed nuclei"]
    correct.labels_combo.setCurrentText(GT)
    assert "Not linked" not in correct.review_label.text()
    assert widgets["Segment"].image_combo.findText("renamed nuclei") >= 0
