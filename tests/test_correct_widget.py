"""The Correct widget in a real napari viewer (pytest-qt under Xvfb)."""
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("napari")

from napari.utils.interactions import mouse_press_callbacks  # noqa: E402

from napari_medrwkv.plugin import correct_widget, review  # noqa: E402
from napari_medrwkv.plugin.correct_widget import CorrectWidget  # noqa: E402
from napari_medrwkv.engine import edit  # noqa: E402

GT = "nuclei fluorescence ground truth"


@pytest.fixture
def errors(monkeypatch):
    seen = []
    monkeypatch.setattr(correct_widget, "show_error", seen.append)
    return seen


@pytest.fixture
def widget(make_napari_viewer, errors):
    viewer = make_napari_viewer()
    viewer.open_sample("napari-medrwkv", "fluorescence")
    w = CorrectWidget(viewer)
    viewer.window.add_dock_widget(w)
    return w


def _press(layer, world_position):
    """A left click at a world position, dispatched the way napari's canvas does."""
    event = SimpleNamespace(type="mouse_press", position=tuple(world_position), button=1, modifiers=(),
                            is_dragging=False, view_direction=None, dims_displayed=(0, 1),
                            dims_point=tuple(world_position))
    mouse_press_callbacks(layer, event)


def _inside(mask):
    """A pixel well inside a mask (the most eroded one)."""
    from scipy import ndimage
    distance = ndimage.distance_transform_edt(mask)
    return np.unravel_index(np.argmax(distance), mask.shape)


def _one_undo_step(layer, before, after_check):
    """The edit already happened: check it, then ONE undo restores ``before`` and redo re-applies it."""
    after = layer.data.copy()
    assert not np.array_equal(after, before)
    after_check(after)
    layer.undo()
    assert np.array_equal(layer.data, before), "one undo did not restore the labels"
    layer.redo()
    assert np.array_equal(layer.data, after)
    layer.undo()


def test_defaults_to_the_active_labels_layer(widget):
    assert widget.labels_combo.currentText() == GT
    assert widget.small_spin.value() == 20 and widget.radius_spin.value() == 2
    widget.viewer.add_labels(np.zeros((8, 8), np.uint8), name="other")
    assert widget.labels_combo.currentText() == "other"          # follows the selected Labels layer
    widget.viewer.layers.selection.active = widget.viewer.layers[GT]
    assert widget.labels_combo.currentText() == GT
    widget.viewer.layers.remove("other")
    assert [widget.labels_combo.itemText(i) for i in range(widget.labels_combo.count())] == [GT]
    widget.viewer.layers[GT].name = "renamed"
    assert widget.labels_combo.currentText() == "renamed"


def test_fill_holes_is_one_undo_step(widget):
    layer = widget.viewer.layers[GT]
    truth = layer.data.copy()
    holed = truth.copy()
    ids = [i for i in np.unique(truth)[1:] if (truth == i).sum() > 150][:5]
    for i in ids:                                  # punch a hole in a few big nuclei
        y, x = _inside(truth == i)
        holed[y - 1:y + 2, x - 1:x + 2] = 0
    layer.data = holed.copy()              # the layer edits its array in place
    assert widget.fill_holes() == 9 * len(ids)
    _one_undo_step(layer, holed, lambda after: np.testing.assert_array_equal(after, edit.fill_holes(holed)))
    assert np.array_equal(edit.fill_holes(holed)[holed != truth], truth[holed != truth])


def test_remove_small_and_smooth_are_one_undo_step_each(widget):
    layer = widget.viewer.layers[GT]
    specked = layer.data.copy()
    specked[0:2, 0:2] = 500                        # specks of new ids on background
    specked[100, 100] = 501 if specked[100, 100] == 0 else specked[100, 100]
    layer.data = specked.copy()
    widget.small_spin.setValue(20)
    widget.small_button.click()
    expected = edit.remove_small(specked, 20)
    assert not (layer.data == 500).any()
    _one_undo_step(layer, specked, lambda after: np.testing.assert_array_equal(after, expected))

    # two helper actions, then one undo takes back only the second
    widget.small_button.click()
    removed = layer.data.copy()
    widget.radius_spin.setValue(2)
    widget.smooth_button.click()
    np.testing.assert_array_equal(layer.data, edit.smooth(removed, 2))
    assert not np.array_equal(layer.data, removed)
    layer.undo()
    np.testing.assert_array_equal(layer.data, removed)
    layer.undo()
    np.testing.assert_array_equal(layer.data, specked)


def test_smooth_boundary_keeps_touching_binary_nuclei_apart(widget, qtbot):
    # Binary labels (every nucleus 1), as a thresholded mask or a semantic model gives them: the
    # closing of the whole mask bridged neighbouring nuclei (187 objects became 153).
    from qtpy.QtCore import Qt
    from skimage.measure import label as connected
    binary = (widget.viewer.layers[GT].data > 0).astype(np.uint8)
    layer = widget.viewer.add_labels(binary.copy(), name="binary")
    widget.labels_combo.setCurrentText("binary")
    widget.radius_spin.setValue(2)
    qtbot.mouseClick(widget.smooth_button, Qt.MouseButton.LeftButton)
    assert not np.array_equal(layer.data, binary) and "Undo with Ctrl+Z" in widget.status.text()
    before, after = connected(binary, connectivity=2), connected(layer.data, connectivity=2)
    merged = [piece for piece in range(1, after.max() + 1) if len(set(np.unique(before[after == piece])) - {0}) > 1]
    assert not merged, f"{len(merged)} objects were merged with a neighbour"
    layer.undo()
    assert np.array_equal(layer.data, binary)


def test_nothing_to_change_adds_no_history(widget):
    layer = widget.viewer.layers[GT]
    before = layer.data.copy()
    widget.radius_spin.setValue(0)
    assert widget.smooth() == 0
    assert "nothing to change" in widget.status.text()
    layer.undo()                                   # nothing to undo
    assert np.array_equal(layer.data, before)


def test_delete_and_keep_by_clicking(widget):
    viewer = widget.viewer
    layer = viewer.layers[GT]
    for each in viewer.layers:                     # world != data coordinates
        each.scale, each.translate = (0.5, 0.5), (10.0, -4.0)
    layer.mode = "paint"
    truth = layer.data.copy()
    target = int(truth[128, 128]) or int(np.unique(truth)[40])
    pixel = _inside(truth == target)
    world = layer.data_to_world(pixel)

    widget.delete_button.setChecked(True)
    assert widget._on_click in layer.mouse_drag_callbacks
    assert layer.mode == "pan_zoom"                # clicks must not paint
    _press(layer, world)
    assert not (layer.data == target).any()
    assert np.array_equal(layer.data[truth != target], truth[truth != target])
    layer.undo()
    assert np.array_equal(layer.data, truth)

    widget.keep_button.setChecked(True)            # exclusive with Delete
    assert not widget.delete_button.isChecked()
    assert layer.mouse_drag_callbacks.count(widget._on_click) == 1
    _press(layer, world)
    assert np.array_equal(layer.data, np.where(truth == target, truth, 0))
    layer.undo()
    assert np.array_equal(layer.data, truth)

    background = np.argwhere(truth == 0)[0]
    _press(layer, layer.data_to_world(background))  # a background click changes nothing
    assert np.array_equal(layer.data, truth) and "No object" in widget.status.text()
    _press(layer, layer.data_to_world((-50, -50)))  # outside the layer
    assert np.array_equal(layer.data, truth)

    widget.keep_button.setChecked(False)
    assert widget._on_click not in layer.mouse_drag_callbacks
    assert layer.mode == "paint"                   # the tool in use before comes back


def test_picking_another_tool_or_layer_moves_or_ends_the_click_mode(widget):
    viewer = widget.viewer
    layer = viewer.layers[GT]
    widget.delete_button.click()
    assert widget.delete_button.isChecked() and widget._on_click in layer.mouse_drag_callbacks
    other = viewer.add_labels(np.zeros((16, 16), np.uint8), name="other")
    assert widget._on_click not in layer.mouse_drag_callbacks
    assert widget._on_click in other.mouse_drag_callbacks
    other.mode = "fill"                            # the user picks a napari tool: our mode ends
    assert not widget.delete_button.isChecked()
    assert widget._on_click not in other.mouse_drag_callbacks
    widget.delete_button.click()
    viewer.layers.remove(other)
    assert widget._on_click not in other.mouse_drag_callbacks
    # removing the layer being clicked ends the mode (no surprise deletions on another layer)
    assert widget.labels_combo.currentText() == GT
    assert not widget.delete_button.isChecked()
    assert widget._on_click not in layer.mouse_drag_callbacks


def test_stack_helpers_change_the_current_slice_only(widget):
    viewer = widget.viewer
    truth = viewer.layers[GT].data
    stack_data = np.stack([truth] * 3)
    stack_data[:, 0:2, 0:2] = 700                  # a speck on every slice
    stack = viewer.add_labels(stack_data.copy(), name="stack")
    assert widget.labels_combo.currentText() == "stack"
    viewer.dims.set_current_step(0, 1)

    widget.remove_small()
    assert (stack.data[1, 0:2, 0:2] == 0).all()
    assert (stack.data[0, 0:2, 0:2] == 700).all() and (stack.data[2, 0:2, 0:2] == 700).all()
    assert np.array_equal(stack.data[[0, 2]], stack_data[[0, 2]])
    widget.smooth()
    widget.fill_holes()
    assert np.array_equal(stack.data[[0, 2]], stack_data[[0, 2]])
    for _ in range(3):
        stack.undo()
    assert np.array_equal(stack.data, stack_data)

    target = int(np.unique(truth)[10])
    y, x = _inside(truth == target)
    widget.delete_button.setChecked(True)
    _press(stack, (1, y, x))
    assert not (stack.data[1] == target).any()
    assert np.array_equal(stack.data[[0, 2]], stack_data[[0, 2]])
    stack.undo()
    assert np.array_equal(stack.data, stack_data)


def test_mark_and_unmark_reviewed(widget):
    viewer = widget.viewer
    layer = viewer.layers[GT]
    assert widget.review_label.text() == "Reviewed: this layer 0 of 1 slice; all layers 0"
    widget.mark_button.click()
    assert review.reviewed(layer) == [0]
    assert review.linked_image(layer) == "nuclei fluorescence"     # so fine-tuning can pair it
    assert widget.review_label.text() == "Reviewed: this layer 1 of 1 slice; all layers 1"
    assert not widget.mark_button.isEnabled() and widget.unmark_button.isEnabled()

    stack = viewer.add_labels(np.zeros((5, 256, 256), np.uint16), name="stack")
    review.link(stack, "nuclei fluorescence")
    for z in (1, 3):
        viewer.dims.set_current_step(0, z)
        widget.mark_reviewed(True)
    assert review.reviewed(stack) == [1, 3]
    assert widget.review_label.text() == "Reviewed: this layer 2 of 5 slices; all layers 3"
    assert not widget.mark_button.isEnabled()
    viewer.dims.set_current_step(0, 2)
    assert widget.mark_button.isEnabled() and not widget.unmark_button.isEnabled()
    viewer.dims.set_current_step(0, 1)
    widget.unmark_button.click()
    assert review.reviewed(stack) == [3]
    assert widget.review_label.text() == "Reviewed: this layer 1 of 5 slices; all layers 2"

    viewer.layers.selection.active = layer
    widget.unmark_button.click()
    assert review.reviewed(layer) == []
    assert widget.review_label.text() == "Reviewed: this layer 0 of 1 slice; all layers 1"


def test_unlinked_reviewed_layer_is_flagged(widget):
    lonely = widget.viewer.add_labels(np.zeros((9, 9), np.uint8), name="lonely")   # no image of that shape
    widget.mark_reviewed(True)
    assert review.reviewed(lonely) == [0]
    assert "all layers 0" in widget.review_label.text()
    assert "Not linked to an image layer" in widget.review_label.text()


def test_no_labels_layer_gives_notifications(make_napari_viewer, errors):
    viewer = make_napari_viewer()
    viewer.add_image(np.zeros((16, 16)), name="image only")
    w = CorrectWidget(viewer)
    assert w.labels_combo.count() == 0
    for action in (w.fill_holes, w.remove_small, w.smooth, lambda: w.mark_reviewed(True)):
        action()
        assert errors and "No labels layer" in errors[-1]
        errors.clear()
    w.delete_button.setChecked(True)
    assert "No labels layer" in errors[-1] and not w.delete_button.isChecked()
    assert w.review_label.text() == "Reviewed: all layers 0"


def test_stack_shown_in_3d_gives_a_notification(widget, errors):
    viewer = widget.viewer
    viewer.add_labels(np.zeros((3, 16, 16), np.uint8), name="stack")
    viewer.dims.ndisplay = 3
    widget.fill_holes()
    assert "show it in 2-D" in errors[-1]
