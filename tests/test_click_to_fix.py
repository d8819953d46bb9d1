"""The Click to fix widget in a real napari viewer (pytest-qt under Xvfb), driven by real mouse events
on the canvas and real key presses.

Most tests replace ``engine.interactive.refine`` by a stand-in whose answer is known (disks around
the clicks, the box filled, the start mask kept; without clicks the mask shrinks, so a carried
object vanishes): an untrained network answers the same whatever is clicked, which would test
nothing.  One test runs the real ``refine`` with an untrained prompt-aware checkpoint.
"""
import time

import numpy as np
import pytest
from scipy import ndimage

from conftest import untrained_checkpoint

pytest.importorskip("napari")

from qtpy.QtCore import QEvent, QPoint, QPointF, Qt  # noqa: E402
from qtpy.QtGui import QMouseEvent  # noqa: E402
from qtpy.QtWidgets import QApplication  # noqa: E402

from napari_medrwkv.engine import interactive  # noqa: E402
from napari_medrwkv.plugin import click_to_fix, review  # noqa: E402
from napari_medrwkv.plugin.click_to_fix import (BOX, NEW_LABELS, PREVIEW, PROMPTS, ClickToFixWidget,  # noqa: E402
                                                paint_object)

RADIUS = 6


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """(prompt-aware, automatic) checkpoint files, both untrained."""
    from napari_medrwkv.engine.checkpoint import save_checkpoint
    from napari_medrwkv.engine.interactive_train import promptable_start
    folder = tmp_path_factory.mktemp("ckpt")
    automatic = untrained_checkpoint(folder / "automatic.safetensors")
    model = promptable_start(automatic)
    save_checkpoint(model.net, folder / "clicks.safetensors", model.info)
    return str(folder / "clicks.safetensors"), automatic


def disk(shape, row, col, radius=RADIUS):
    rr, cc = np.mgrid[:shape[0], :shape[1]]
    return (rr - row) ** 2 + (cc - col) ** 2 <= radius ** 2


class FakeRefine:
    """Disks of RADIUS around the points (added inside, cut outside), the box filled, over the start
    mask; with no point and no box the mask shrinks by 2 pixels.  ``delays``: seconds to sleep, call
    by call."""

    def __init__(self):
        self.calls, self.delays = [], []

    def __call__(self, image, points=(), box=None, mask=None, model=None, device="auto", threshold=0.5, rgb=None):
        self.calls.append((list(points), box, None if mask is None else mask.copy()))
        if self.delays:
            time.sleep(self.delays.pop(0))
        return self.answer(image.shape[:2], points, box, mask)

    @staticmethod
    def answer(shape, points=(), box=None, mask=None):
        out = np.zeros(shape, bool) if mask is None else np.asarray(mask, bool).copy()
        if not points and box is None:
            return ndimage.binary_erosion(out, iterations=2)
        if box is not None:
            out[box[0]:box[2], box[1]:box[3]] = True
        for row, col, positive in points:
            if positive:
                out |= disk(shape, row, col)
            else:
                out &= ~disk(shape, row, col)
        return out


@pytest.fixture
def fake(monkeypatch):
    refine = FakeRefine()
    monkeypatch.setattr(interactive, "refine", refine)
    return refine


@pytest.fixture
def errors(monkeypatch):
    seen = []
    monkeypatch.setattr(click_to_fix, "show_error", seen.append)
    return seen


def _objects(shape=(64, 80)):
    """An image and its labels: object 1 a square, object 2 a disk."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 60, shape, dtype=np.uint8)
    labels = np.zeros(shape, np.int32)
    labels[10:26, 10:26] = 1
    labels[disk(shape, 45, 55, 8)] = 2
    image[labels > 0] += 150
    return image, labels


@pytest.fixture
def make_widget(make_napari_viewer, checkpoints, qtbot, errors):
    def make(image=None, labels=None, scale=None, translate=None):
        viewer = make_napari_viewer(show=True)
        image_default, labels_default = _objects()
        image = image_default if image is None else image
        kwargs = {key: value for key, value in (("scale", scale), ("translate", translate)) if value is not None}
        viewer.add_image(image, name="cells", **kwargs)
        if labels is not False:
            viewer.add_labels(labels_default if labels is None else labels, name="cells labels", **kwargs)
        widget = ClickToFixWidget(viewer)
        viewer.window.add_dock_widget(widget)
        assert widget.add_model_source(checkpoints[0])
        widget.image_combo.setCurrentText("cells")
        assert widget.start(), widget.status.text()
        viewer.reset_view()
        qtbot.wait(50)
        return widget
    return make


# --------------------------------------------------------------------------- real events
def _canvas(viewer):
    return viewer.window._qt_viewer.canvas


def _screen(viewer, layer, data_position) -> QPoint:
    """Where on the canvas widget the pixel ``data_position`` of ``layer`` is drawn."""
    world = layer.data_to_world(data_position)
    view = _canvas(viewer).view
    x, y = (view.transform * view.scene.transform).map([world[-1], world[-2]])[:2]
    return QPoint(int(round(x)), int(round(y)))


def click(qtbot, widget, row, col, button=Qt.MouseButton.LeftButton, modifier=Qt.KeyboardModifier.NoModifier,
          wait=True):
    viewer = widget.viewer
    layer = viewer.layers["cells"]
    z = [] if layer.ndim == 2 else [viewer.dims.current_step[0]]
    qtbot.mouseClick(_canvas(viewer).native, button, modifier, _screen(viewer, layer, z + [row, col]))
    if wait:
        idle(qtbot, widget)


def hover(widget, row, col, buttons=Qt.MouseButton.NoButton):
    """The mouse moved over the pixel (row, col) of the image (with ``buttons`` held), as Qt tells the canvas."""
    viewer = widget.viewer
    canvas = _canvas(viewer).native
    local = QPointF(_screen(viewer, viewer.layers["cells"], [row, col]))
    event = QMouseEvent(QEvent.Type.MouseMove, local, QPointF(canvas.mapToGlobal(local.toPoint())),
                        Qt.MouseButton.NoButton, buttons, Qt.KeyboardModifier.NoModifier)
    QApplication.sendEvent(canvas, event)


def key(qtbot, widget, name, modifier=Qt.KeyboardModifier.NoModifier):
    qtbot.keyClick(_canvas(widget.viewer).native, getattr(Qt.Key, f"Key_{name}"), modifier)


def idle(qtbot, widget, timeout=60000):
    qtbot.waitUntil(lambda: widget.worker is None and widget._pending is None and not widget._carries,
                    timeout=timeout)


def preview(widget):
    data = widget.viewer.layers[PREVIEW].data
    return (data if data.ndim == 2 else data[widget.viewer.dims.current_step[0]]) > 0


# --------------------------------------------------------------------------- tests
def test_models_and_errors_before_any_click(make_napari_viewer, checkpoints, errors):
    viewer = make_napari_viewer()
    widget = ClickToFixWidget(viewer)
    models = [widget.model_combo.itemText(i) for i in range(widget.model_combo.count())]
    from napari_medrwkv.engine.model import read_model_info
    assert all(read_model_info(m).prompt_channels > 0 for m in models[:-1]), models
    assert not widget.start()                                     # no image
    assert "No image layer" in widget.status.text() and errors and not widget.start_button.isChecked()
    viewer.add_image(np.zeros((32, 32), np.uint8), name="blank")
    widget.model_combo.setCurrentText(click_to_fix.BROWSE)
    if widget.model_combo.currentText() == click_to_fix.BROWSE:  # no shipped prompt-aware model yet
        assert not widget.start()
        assert "prompt-aware model" in widget.status.text()
    assert not widget.add_model_source(checkpoints[1])           # an automatic model: it takes no clicks
    assert "takes no clicks" in widget.status.text() and "takes no clicks" in errors[-1]
    assert checkpoints[1] not in [widget.model_combo.itemText(i) for i in range(widget.model_combo.count())]
    assert widget.add_model_source(checkpoints[0])
    assert widget.labels_combo.currentText() == NEW_LABELS      # no Labels layer yet
    assert widget.start() and widget.start_button.isChecked() and widget.start_button.text() == "Stop"
    assert {PROMPTS, PREVIEW} <= {layer.name for layer in viewer.layers}
    widget.start_button.click()                                   # Stop
    assert {layer.name for layer in viewer.layers} == {"blank"}


def test_a_click_shows_a_point_and_the_real_models_answer(make_widget, qtbot, checkpoints):
    widget = make_widget(scale=(0.5, 2.0), translate=(3, -7))    # clicks land in data pixels whatever the scale
    viewer = widget.viewer
    click(qtbot, widget, 20, 30)
    points = viewer.layers[PROMPTS]
    np.testing.assert_allclose(points.data, [[20, 30]])
    np.testing.assert_allclose(points.face_color[0], click_to_fix.POSITIVE)
    np.testing.assert_allclose(points.scale, (0.5, 2.0))
    from napari_medrwkv.engine.model import load_model
    expected = interactive.refine(viewer.layers["cells"].data, points=[(20, 30, True)],
                                  model=load_model(checkpoints[0], device="cpu"))
    assert widget.shown == 1
    np.testing.assert_array_equal(preview(widget), expected)
    assert "C commits" in widget.status.text() and "redrawn in" in widget.status.text()


def test_clicks_build_the_object_and_commit_adds_a_new_id_over_background_only(make_widget, qtbot, fake):
    widget = make_widget()
    viewer = widget.viewer
    labels = viewer.layers["cells labels"]
    before = labels.data.copy()
    click(qtbot, widget, 30, 30)                                 # near object 1 (rows 10..25, cols 10..25)
    click(qtbot, widget, 27, 24)                                 # its disk reaches into object 1
    click(qtbot, widget, 34, 34, button=Qt.MouseButton.RightButton)               # outside: right click
    click(qtbot, widget, 30, 38, modifier=Qt.KeyboardModifier.ShiftModifier)      # outside: Shift+click
    points = viewer.layers[PROMPTS]
    assert [tuple(p) for p in points.data] == [(30, 30), (27, 24), (34, 34), (30, 38)]
    colours = [click_to_fix.POSITIVE[:3]] * 2 + [click_to_fix.NEGATIVE[:3]] * 2
    np.testing.assert_allclose(points.face_color[:, :3], colours)
    last_mask = fake.calls[-1][2]
    expected = FakeRefine.answer(before.shape, [(30, 30, True), (27, 24, True), (34, 34, False), (30, 38, False)],
                                 mask=last_mask)
    np.testing.assert_array_equal(preview(widget), expected)
    assert (expected & (before == 1)).any()                     # the object reaches over object 1

    key(qtbot, widget, "C")
    after = labels.data.copy()
    assert after.max() == 3                                      # a new id
    np.testing.assert_array_equal(after == 3, expected & (before == 0))
    np.testing.assert_array_equal(after[before > 0], before[before > 0])   # nobody else's pixels
    assert not preview(widget).any() and len(points.data) == 0  # ready for the next object
    assert "Committed object 3" in widget.status.text()

    # one step of napari's undo, and redo
    labels.undo()
    np.testing.assert_array_equal(labels.data, before)
    labels.redo()
    np.testing.assert_array_equal(labels.data, after)

    # asked to, it paints over other objects
    widget.overwrite_check.setChecked(True)
    click(qtbot, widget, 18, 18)
    key(qtbot, widget, "C")
    assert (labels.data[disk(before.shape, 18, 18)] == 4).all()
    assert review.reviewed(labels) == []                         # nothing marked reviewed by itself
    review.set_reviewed(labels, 0)                               # nor unmarked: an edit like painting
    click(qtbot, widget, 55, 10)
    key(qtbot, widget, "C")
    assert labels.data.max() == 5 and review.reviewed(labels) == [0]


def test_t_swaps_inside_and_outside_for_left_clicks(make_widget, qtbot, fake):
    widget = make_widget()
    click(qtbot, widget, 40, 20)
    key(qtbot, widget, "T")
    assert "OUTSIDE" in widget.status.text()
    click(qtbot, widget, 42, 24)
    click(qtbot, widget, 30, 50, modifier=Qt.KeyboardModifier.ShiftModifier)    # Shift now means inside
    key(qtbot, widget, "T")
    click(qtbot, widget, 50, 60)
    newest = [points[-1] for points, _, _ in fake.calls]
    assert newest == [(40, 20, True), (42, 24, False), (30, 50, True), (50, 60, True)]


def test_the_labels_choice(make_widget, qtbot, fake):
    widget = make_widget()
    viewer = widget.viewer
    assert widget.labels_combo.currentText() == "cells labels"            # an existing layer before a new one
    viewer.layers["cells labels"].name = "renamed"                        # followed, not lost
    assert widget.labels_combo.currentText() == "renamed"
    viewer.layers["cells"].name = "cells too"
    assert widget.image_combo.currentText() == "cells too"
    viewer.layers["cells too"].name = "cells"
    click(qtbot, widget, 40, 20)
    key(qtbot, widget, "C")
    assert viewer.layers["renamed"].data.max() == 3
    widget.labels_combo.setCurrentText(NEW_LABELS)                      # chosen: kept as layers come and go
    viewer.add_labels(np.zeros((64, 80), np.uint8), name="other")
    widget.stop()
    widget.start()
    assert widget.labels_combo.currentText() == NEW_LABELS
    assert PREVIEW not in [widget.labels_combo.itemText(i) for i in range(widget.labels_combo.count())]
    viewer.layers.selection.active = viewer.layers["other"]
    widget.labels_combo.setCurrentText("other")
    viewer.add_image(np.zeros((64, 80)), name="more")
    assert widget.labels_combo.currentText() == "other"


def test_undo_prompt_restores_the_previous_object_and_reset_clears(make_widget, qtbot, fake):
    widget = make_widget()
    viewer = widget.viewer
    click(qtbot, widget, 40, 20)
    first = preview(widget).copy()
    click(qtbot, widget, 42, 24, modifier=Qt.KeyboardModifier.ShiftModifier)
    second = preview(widget).copy()
    assert not np.array_equal(first, second)
    calls = len(fake.calls)
    key(qtbot, widget, "Z")
    idle(qtbot, widget)
    np.testing.assert_array_equal(preview(widget), first)
    assert len(viewer.layers[PROMPTS].data) == 1 and len(fake.calls) == calls    # shown again, not recomputed
    click(qtbot, widget, 42, 24, modifier=Qt.KeyboardModifier.ShiftModifier)
    key(qtbot, widget, "Z", Qt.KeyboardModifier.ControlModifier)                  # Ctrl+Z too
    idle(qtbot, widget)
    np.testing.assert_array_equal(preview(widget), first)
    key(qtbot, widget, "Z")
    assert not preview(widget).any() and len(viewer.layers[PROMPTS].data) == 0
    key(qtbot, widget, "Z")
    assert "No prompt to undo" in widget.status.text() and "Ctrl+Z" in widget.status.text()

    click(qtbot, widget, 40, 20)
    assert preview(widget).any()
    key(qtbot, widget, "R")
    assert not preview(widget).any() and len(viewer.layers[PROMPTS].data) == 0
    click(qtbot, widget, 40, 20)
    key(qtbot, widget, "Escape")
    assert not preview(widget).any() and len(viewer.layers[PROMPTS].data) == 0
    key(qtbot, widget, "C")
    assert "Nothing to commit" in widget.status.text()
    assert viewer.layers["cells labels"].data.max() == 2


def test_fix_picks_the_object_under_the_cursor_and_commit_replaces_it(make_widget, qtbot, fake):
    widget = make_widget()
    viewer = widget.viewer
    labels = viewer.layers["cells labels"]
    before = labels.data.copy()
    hover(widget, 45, 55)
    qtbot.waitUntil(lambda: np.allclose(labels.world_to_data(viewer.cursor.position), [45, 55], atol=1))
    key(qtbot, widget, "F")
    np.testing.assert_array_equal(preview(widget), before == 2)
    assert "Fixing object 2" in widget.status.text()
    click(qtbot, widget, 52, 55, modifier=Qt.KeyboardModifier.ShiftModifier)      # cut its lower part off
    fixed = (before == 2) & ~disk(before.shape, 52, 55)
    np.testing.assert_array_equal(preview(widget), fixed)
    click(qtbot, widget, 40, 66)                                                    # and grow it to the right
    fixed |= disk(before.shape, 40, 66)
    np.testing.assert_array_equal(preview(widget), fixed)
    assert fake.calls[0][2] is not None and (fake.calls[0][2] == (before == 2)).all()   # its mask was the start
    key(qtbot, widget, "C")
    after = labels.data
    np.testing.assert_array_equal(after == 2, fixed)           # same id, its pixels replaced
    np.testing.assert_array_equal(after == 1, before == 1)
    assert after.max() == 2
    labels.undo()
    np.testing.assert_array_equal(labels.data, before)

    hover(widget, 2, 2)
    qtbot.waitUntil(lambda: np.allclose(labels.world_to_data(viewer.cursor.position), [2, 2], atol=1))
    key(qtbot, widget, "F")
    assert "No object" in widget.status.text()


def test_a_newer_click_drops_the_stale_answer(make_widget, qtbot, fake):
    widget = make_widget()
    fake.delays = [2.0, 0.0, 0.0]               # the first answer comes late
    shown, show = [], widget._show
    widget._show = lambda mask, key: (shown.append(None if mask is None else mask.copy()), show(mask, key))
    click(qtbot, widget, 30, 40, wait=False)
    qtbot.waitUntil(lambda: widget.worker is not None and len(fake.calls) == 1)
    click(qtbot, widget, 50, 20, wait=False)   # while the first runs
    idle(qtbot, widget)
    expected = FakeRefine.answer((64, 80), [(30, 40, True), (50, 20, True)])
    np.testing.assert_array_equal(preview(widget), expected)
    assert widget.dropped == 1 and widget.shown == 1
    assert [len(points) for points, _, _ in fake.calls] == [1, 2]
    assert len(shown) == 1 and np.array_equal(shown[0], expected)     # the first answer never appeared

    # three quick clicks while one runs: the middle request never runs at all
    fake.delays = [2.0, 0.0, 0.0]
    key(qtbot, widget, "R")
    click(qtbot, widget, 10, 10, wait=False)
    qtbot.waitUntil(lambda: widget.worker is not None and len(fake.calls) == 3)
    click(qtbot, widget, 12, 60, wait=False)
    click(qtbot, widget, 40, 40, wait=False)
    idle(qtbot, widget)
    assert [len(points) for points, _, _ in fake.calls[2:]] == [1, 3]
    np.testing.assert_array_equal(preview(widget), FakeRefine.answer((64, 80), [(10, 10, True), (12, 60, True),
                                                                               (40, 40, True)]))


def test_commit_waits_for_the_newest_answer(make_widget, qtbot, fake):
    widget = make_widget()
    fake.delays = [0.5]
    click(qtbot, widget, 40, 20, wait=False)
    key(qtbot, widget, "C")                     # before the object has redrawn
    assert "when the object has redrawn" in widget.status.text()
    idle(qtbot, widget)
    qtbot.waitUntil(lambda: widget.viewer.layers["cells labels"].data.max() == 3)
    np.testing.assert_array_equal(widget.viewer.layers["cells labels"].data == 3,
                                  disk((64, 80), 40, 20) & (_objects()[1] == 0))


def test_bad_input_says_what_is_wrong(make_widget, qtbot, fake, errors):
    widget = make_widget(labels=False)
    viewer = widget.viewer
    click(qtbot, widget, -12, 30)                                  # above the image
    assert "lies outside cells (64x80)" in widget.status.text() and "lies outside" in errors[-1]
    assert len(viewer.layers[PROMPTS].data) == 0 and not fake.calls
    click(qtbot, widget, 20, 20, modifier=Qt.KeyboardModifier.ShiftModifier)   # outside the object, alone
    assert "click inside it" in widget.status.text() and not fake.calls
    key(qtbot, widget, "F")
    assert "Choose the Labels layer" in widget.status.text()
    # no Labels layer: the first commit makes one, tied to the image for Fine-tune
    click(qtbot, widget, 30, 30)
    key(qtbot, widget, "C")
    made = viewer.layers["cells objects"]
    assert made.data.max() == 1 and review.linked_image(made) == "cells"
    assert widget.labels_combo.currentText() == "cells objects"
    names = [layer.name for layer in viewer.layers]
    assert names.index("cells objects") < names.index(PREVIEW) < names.index(PROMPTS)


def test_a_drag_pans_and_adds_no_point(make_widget, qtbot, fake):
    widget = make_widget()
    viewer = widget.viewer
    canvas, layer = _canvas(viewer).native, viewer.layers["cells"]
    centre = np.array(viewer.camera.center)
    qtbot.mousePress(canvas, Qt.MouseButton.LeftButton, Qt.KeyboardModifier.NoModifier,
                     _screen(viewer, layer, [30, 30]))
    for step in range(1, 6):
        hover(widget, 30 + 3 * step, 30 + 3 * step, Qt.MouseButton.LeftButton)
    qtbot.mouseRelease(canvas, Qt.MouseButton.LeftButton, Qt.KeyboardModifier.NoModifier,
                       _screen(viewer, layer, [45, 45]))
    idle(qtbot, widget)
    assert len(viewer.layers[PROMPTS].data) == 0 and not fake.calls
    qtbot.waitUntil(lambda: not np.allclose(viewer.camera.center, centre))   # the view moved instead


def test_ctrl_drag_draws_a_box(make_widget, qtbot, fake):
    widget = make_widget()
    viewer = widget.viewer
    canvas, layer = _canvas(viewer).native, viewer.layers["cells"]
    centre = tuple(viewer.camera.center)
    qtbot.mousePress(canvas, Qt.MouseButton.LeftButton, Qt.KeyboardModifier.ControlModifier,
                     _screen(viewer, layer, [30, 30]))
    qtbot.mouseMove(canvas, _screen(viewer, layer, [40, 45]))
    qtbot.mouseRelease(canvas, Qt.MouseButton.LeftButton, Qt.KeyboardModifier.ControlModifier,
                       _screen(viewer, layer, [50, 60]))
    idle(qtbot, widget)
    assert tuple(viewer.camera.center) == centre and viewer.camera.mouse_pan   # no panning, and panning is back
    box = fake.calls[-1][1]
    assert box is not None and abs(box[0] - 30) <= 1 and abs(box[1] - 30) <= 1 and abs(box[2] - 51) <= 1
    assert BOX in viewer.layers and len(viewer.layers[BOX].data) == 1
    assert preview(widget)[35:45, 35:55].all()
    key(qtbot, widget, "Z")
    assert len(viewer.layers[BOX].data) == 0 and not preview(widget).any()


def test_a_stack_works_on_the_slice_shown_and_carries_to_its_neighbours(make_widget, qtbot, fake):
    image2d, _ = _objects()
    stack = np.stack([image2d] * 7)
    labels = np.zeros(stack.shape, np.int32)
    labels[:, 10:26, 10:26] = 1
    widget = make_widget(image=stack, labels=labels, scale=(4.0, 1.0, 1.0))
    viewer = widget.viewer
    assert widget.carry_check.isEnabled()
    viewer.dims.set_current_step(0, 3)
    click(qtbot, widget, 45, 50)
    assert viewer.layers[PROMPTS].data.tolist() == [[3, 45, 50]]
    assert preview(widget).any() and not (viewer.layers[PREVIEW].data[2] > 0).any()
    widget.carry_check.setChecked(True)
    widget.carry_spin.setValue(5)
    before = viewer.layers["cells labels"].data.copy()
    key(qtbot, widget, "C")
    idle(qtbot, widget)
    qtbot.waitUntil(lambda: viewer.layers["cells labels"].data.max() == 2)
    data = viewer.layers["cells labels"].data
    # slice 3 is the clicked disk; each neighbour shrinks by 2 pixels, until the disk (radius 6) is gone
    committed = [int((data[z] == 2).sum()) for z in range(7)]
    assert committed[3] == disk((64, 80), 45, 50).sum()
    assert committed[2] == committed[4] > committed[1] == committed[5] > 0
    assert committed[0] == committed[6] == 0 or committed[0] < committed[1]
    np.testing.assert_array_equal(data == 1, before == 1)
    viewer.layers["cells labels"].undo()                                    # one step for every slice
    np.testing.assert_array_equal(viewer.layers["cells labels"].data, before)
    # a click on another slice starts a new object there
    click(qtbot, widget, 45, 50)
    viewer.dims.set_current_step(0, 5)
    click(qtbot, widget, 20, 60, wait=False)
    assert "the one on slice 3 was not committed" in widget.status.text()
    idle(qtbot, widget)
    assert viewer.layers[PROMPTS].data.tolist() == [[5, 20, 60]]
    assert not (viewer.layers[PREVIEW].data[3] > 0).any()


def test_stopping_gives_napari_its_keys_and_clicks_back(make_widget, qtbot, fake):
    widget = make_widget()
    viewer = widget.viewer
    callbacks = list(viewer.mouse_drag_callbacks)
    widget.stop()
    assert {PROMPTS, PREVIEW} & {layer.name for layer in viewer.layers} == set()
    assert len(viewer.mouse_drag_callbacks) == len(callbacks) - 1
    points = viewer.add_points(name="mine")
    points.mode = "add"
    key(qtbot, widget, "Z")                     # napari's own key on a Points layer: pan/zoom
    assert str(points.mode) == "pan_zoom"
    click(qtbot, widget, 30, 30)
    assert not fake.calls
    # removing a layer of the mode stops it
    assert widget.start()
    viewer.layers.remove(PROMPTS)
    assert not widget.start_button.isChecked() and PREVIEW not in viewer.layers


def test_paint_object():
    before = np.array([[0, 1, 1], [0, 2, 0], [2, 2, 0]])
    mask = np.array([[1, 1, 0], [1, 1, 0], [0, 0, 0]], bool)
    np.testing.assert_array_equal(paint_object(before, mask, 3), [[3, 1, 1], [3, 2, 0], [2, 2, 0]])
    np.testing.assert_array_equal(paint_object(before, mask, 3, overwrite=True), [[3, 3, 1], [3, 3, 0], [2, 2, 0]])
    np.testing.assert_array_equal(paint_object(before, mask, 2, replace=True), [[2, 1, 1], [2, 2, 0], [0, 0, 0]])
