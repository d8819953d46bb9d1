"""Instances in the widgets: Segment shows one label per object, Correct splits and merges objects."""
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("napari")

from napari.utils.interactions import mouse_press_callbacks  # noqa: E402

from napari_medrwkv.plugin import correct_widget  # noqa: E402
from napari_medrwkv.plugin.correct_widget import MERGE, SPLIT, CorrectWidget  # noqa: E402


def _press(layer, world_position):
    """A left click at a world position, dispatched the way napari's canvas does."""
    event = SimpleNamespace(type="mouse_press", position=tuple(world_position), button=1, modifiers=(),
                            is_dragging=False, view_direction=None, dims_displayed=(0, 1),
                            dims_point=tuple(world_position))
    mouse_press_callbacks(layer, event)


def _two_touching_discs():
    yy, xx = np.mgrid[:60, :90]
    labels = np.zeros((60, 90), np.uint16)
    labels[((yy - 30) ** 2 + (xx - 30) ** 2 <= 225) | ((yy - 30) ** 2 + (xx - 56) ** 2 <= 225)] = 4
    labels[5:9, 80:85] = 9
    return labels


@pytest.fixture
def correct(make_napari_viewer, monkeypatch):
    seen = []
    monkeypatch.setattr(correct_widget, "show_error", seen.append)
    viewer = make_napari_viewer()
    viewer.add_labels(_two_touching_discs(), name="nuclei")
    w = CorrectWidget(viewer)
    viewer.window.add_dock_widget(w)
    w.errors = seen
    return w


def test_split_at_two_seeds_is_one_undo_step(correct):
    layer = correct.viewer.layers["nuclei"]
    before = layer.data.copy()
    correct.split_button.click()
    assert correct._click_mode == SPLIT
    _press(layer, (30, 28))
    _press(layer, (7, 82))                       # another object: not a seed of this one
    assert "not object 4" in correct.status.text() and not correct.apply_picks_button.isEnabled()
    _press(layer, (30, 58))
    assert correct.apply_picks_button.isEnabled()
    correct.apply_picks_button.click()
    after = layer.data.copy()
    assert set(np.unique(after)) == {0, 4, 9, 10}
    assert after[30, 22] == 4 and after[30, 64] == 10          # each disc its own id, the first keeps 4
    assert abs((after == 4).sum() - (after == 10).sum()) < 30
    np.testing.assert_array_equal(after > 0, before > 0)        # no pixel gained or lost
    layer.undo()
    np.testing.assert_array_equal(layer.data, before)           # one undo step
    layer.redo()
    np.testing.assert_array_equal(layer.data, after)
    assert correct._click_mode == SPLIT and not correct._picks  # ready for the next object


def test_merge_of_picked_objects_is_one_undo_step(correct):
    layer = correct.viewer.layers["nuclei"]
    layer.data = np.where(layer.data == 4, np.where(np.arange(90) < 43, 4, 5), layer.data).astype(np.uint16)
    before = layer.data.copy()
    correct.merge_button.click()
    assert correct._click_mode == MERGE
    for point in ((30, 28), (30, 58), (7, 82)):
        _press(layer, point)
    assert "4, 5, 9 picked" in correct.status.text()
    assert correct.apply_picks() > 0
    after = layer.data.copy()
    assert set(np.unique(after)) == {0, 4}
    layer.undo()
    np.testing.assert_array_equal(layer.data, before)
    _press(layer, (0, 0))                                       # background: not picked
    assert not correct._picks and "background" in correct.status.text()
    correct.merge_button.click()                                # off: nothing pending, nothing changed
    np.testing.assert_array_equal(layer.data, before)


def test_segment_widget_shows_an_instance_model_as_labels(make_napari_viewer, qtbot, tmp_path):
    from napari.layers import Labels
    from napari_medrwkv.engine.checkpoint import save_checkpoint
    from napari_medrwkv.engine.model import load_model, with_instances
    from napari_medrwkv.plugin.segment_widget import SegmentWidget
    model = with_instances(load_model("rwkv_unet_t-dsb2018", device="cpu"))
    path = save_checkpoint(model.net, tmp_path / "nuclei-instances.safetensors", model.info)
    viewer = make_napari_viewer()
    widget = SegmentWidget(viewer)
    viewer.window.add_dock_widget(widget)
    widget.add_model_source(str(path))
    viewer.open_sample("napari-medrwkv", "fluorescence")
    widget.image_combo.setCurrentText("nuclei fluorescence")
    widget.model_combo.setCurrentText(str(path))
    widget.run()
    qtbot.waitUntil(lambda: widget.worker is None, timeout=60000)
    layer = viewer.layers["nuclei fluorescence [nuclei-instances]"]
    assert isinstance(layer, Labels) and layer.data.dtype == np.uint16
    count = int(layer.data.max())
    assert count > 50 and len(np.unique(layer.data)) == count + 1
    assert f"{count} objects" in widget.status.text()
