"""The Segment widget in a real napari viewer (pytest-qt under Xvfb)."""
import numpy as np
import pytest

from conftest import untrained_checkpoint

pytest.importorskip("napari")

from napari_medrwkv.plugin import segment_widget  # noqa: E402
from napari_medrwkv.plugin.review import user_edited  # noqa: E402
from napari_medrwkv.plugin.segment_widget import SegmentWidget  # noqa: E402


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return untrained_checkpoint(tmp_path_factory.mktemp("ckpt") / "nuclei-test.safetensors")


@pytest.fixture
def widget(make_napari_viewer, checkpoint, qtbot):
    viewer = make_napari_viewer()
    w = SegmentWidget(viewer)
    viewer.window.add_dock_widget(w)
    w.add_model_source(checkpoint)
    return w


def _wait(widget, qtbot, timeout=60000):
    qtbot.waitUntil(lambda: widget.worker is None, timeout=timeout)


@pytest.fixture
def errors(monkeypatch):
    seen = []
    monkeypatch.setattr(segment_widget, "show_error", seen.append)
    return seen


def test_segment_adds_labels_tied_to_the_image(widget, qtbot):
    viewer = widget.viewer
    viewer.open_sample("napari-medrwkv", "brightfield")
    image = viewer.layers["nuclei brightfield"]
    image.scale, image.translate = (0.5, 0.25), (10, -4)
    widget.image_combo.setCurrentText(image.name)
    widget.probability_check.setChecked(True)
    widget.run()
    _wait(widget, qtbot)
    labels = viewer.layers["nuclei brightfield [nuclei-test]"]
    assert labels.data.shape == (256, 320) and set(np.unique(labels.data)) <= {0, 1}
    assert np.allclose(labels.scale, image.scale) and np.allclose(labels.translate, image.translate)
    prob = viewer.layers["nuclei brightfield [nuclei-test] probability"]
    assert prob.data.shape == (256, 320) and 0 <= prob.data.min() and prob.data.max() <= 1
    assert np.array_equal(labels.data, (prob.data > 0.5).astype(labels.data.dtype))
    assert widget.progress_bar.value() == widget.progress_bar.maximum() > 0
    assert not user_edited(labels)
    # test-time flips: the probabilities of the engine's flips=True
    from napari_medrwkv.engine.infer import segment
    widget.flips_check.setChecked(True)
    viewer.layers.remove(labels)
    viewer.layers.remove(prob)
    widget.run()
    _wait(widget, qtbot)
    model, = widget._models.values()            # the one loaded for the first run, reused
    expected = segment(image.data, model=model, flips=True, return_probabilities=True)[1]
    np.testing.assert_allclose(viewer.layers["nuclei brightfield [nuclei-test] probability"].data, expected, atol=1e-5)


def test_edited_labels_are_never_replaced_without_asking(widget, qtbot, monkeypatch):
    viewer = widget.viewer
    viewer.add_image(np.random.default_rng(0).integers(0, 255, (64, 80), dtype=np.uint8), name="img")
    widget.image_combo.setCurrentText("img")
    widget.run()
    _wait(widget, qtbot)
    labels = viewer.layers["img [nuclei-test]"]
    labels.data[:5, :5] = 7                               # the user's correction
    edited = labels.data.copy()
    asked = []
    monkeypatch.setattr(segment_widget.QMessageBox, "question",
                        lambda *a, **k: asked.append(a) or segment_widget.QMessageBox.StandardButton.No)
    widget.run()
    _wait(widget, qtbot)
    assert len(asked) == 1
    assert np.array_equal(viewer.layers["img [nuclei-test]"].data, edited)
    assert "img [nuclei-test] (2)" in viewer.layers
    # An unedited result is simply refreshed, without a question.
    widget.run()
    _wait(widget, qtbot)
    assert len(asked) == 2 and "img [nuclei-test] (3)" in viewer.layers


def test_stack_current_slice_only(widget, qtbot):
    viewer = widget.viewer
    stack = np.random.default_rng(1).integers(0, 255, (3, 48, 64), dtype=np.uint8)
    viewer.add_image(stack, name="stack")
    viewer.dims.set_current_step(0, 1)
    widget.image_combo.setCurrentText("stack")
    widget.probability_check.setChecked(True)
    widget.run()
    _wait(widget, qtbot)
    prob = viewer.layers["stack [nuclei-test] probability"].data
    assert prob.shape == (3, 48, 64)
    assert prob[1].min() > 0 and not prob[0].any() and not prob[2].any()
    widget.scope_combo.setCurrentText("all slices")
    formats = []
    widget._relay.tiles.connect(lambda d, t: formats.append(widget.progress_bar.format()))
    widget.run()
    _wait(widget, qtbot)
    assert viewer.layers["stack [nuclei-test] probability"].data.min() > 0
    assert [f.split()[1] for f in formats] == ["1/3", "2/3", "3/3"]      # one tile per slice


def test_cancel_stops_and_changes_nothing_while_the_gui_stays_live(widget, qtbot):
    viewer = widget.viewer
    viewer.add_image(np.random.default_rng(2).integers(0, 255, (1500, 1500), dtype=np.uint8), name="big")
    widget.image_combo.setCurrentText("big")
    widget.tile_spin.setValue(128)
    ticks = []
    from qtpy.QtCore import QTimer
    timer = QTimer()
    timer.timeout.connect(lambda: ticks.append(1))
    timer.start(20)
    widget.run()
    assert not widget.run_button.isEnabled() and widget.cancel_button.isEnabled()
    qtbot.waitUntil(lambda: widget.progress_bar.value() >= 2, timeout=60000)
    widget.run()                                           # a second click starts nothing
    widget.cancel()
    _wait(widget, qtbot)
    timer.stop()
    assert "Cancelled" in widget.status.text()
    assert "big [nuclei-test]" not in viewer.layers
    assert widget.progress_bar.value() < widget.progress_bar.maximum()
    assert len(ticks) >= 3, "the event loop kept running during segmentation"
    assert widget.run_button.isEnabled()


def test_bad_inputs_give_notifications(widget, errors, qtbot):
    widget.run()                                           # no image layer at all
    assert errors and "No image layer" in errors[-1]
    widget.viewer.add_image(np.zeros((2, 3, 16, 16)), name="4d")
    widget.image_combo.setCurrentText("4d")
    widget.run()
    assert "4 spatial dimensions" in errors[-1] and widget.worker is None
    widget.viewer.add_image(np.zeros((16, 16)), name="flat")
    widget.image_combo.setCurrentText("flat")
    widget.add_model_source("/no/such/model.safetensors")
    widget.run()
    _wait(widget, qtbot)
    assert "/no/such/model.safetensors" in errors[-1]


def test_inference_controls_show_the_chosen_models_settings_and_reach_segment(widget, qtbot, checkpoint, tmp_path):
    from scipy import ndimage
    from napari_medrwkv.engine.checkpoint import read_info, write_info
    from napari_medrwkv.engine.model import shipped_path
    calibrated = tmp_path / "one-nucleus.safetensors"
    info = read_info(shipped_path("rwkv_unet_t-dsb2018"))
    info.inference = {"flips": True, "threshold": 0.6, "largest_component": True}
    write_info(shipped_path("rwkv_unet_t-dsb2018"), info, calibrated)
    widget.add_model_source(str(calibrated))
    assert widget.flips_check.isChecked() and widget.largest_check.isChecked()
    assert widget.threshold_spin.value() == pytest.approx(0.6) and widget.threshold_spin.isEnabled()
    widget.model_combo.setCurrentText("rwkv_unet_t-dsb2018")              # the shipped file: plain settings
    assert not widget.flips_check.isChecked() and not widget.largest_check.isChecked()
    assert widget.threshold_spin.value() == pytest.approx(0.5)
    widget.model_combo.setCurrentText(str(calibrated))
    widget.flips_check.setChecked(False)                                  # the user's choice wins
    viewer = widget.viewer
    viewer.open_sample("napari-medrwkv", "brightfield")
    widget.image_combo.setCurrentText("nuclei brightfield")
    widget.probability_check.setChecked(True)
    widget.run()
    _wait(widget, qtbot)
    labels = viewer.layers["nuclei brightfield [one-nucleus]"].data
    prob = viewer.layers["nuclei brightfield [one-nucleus] probability"].data
    assert ndimage.label(labels, np.ones((3, 3)))[1] == 1 and labels.sum() > 20
    from napari_medrwkv.engine.infer import segment
    model = widget._models[(str(calibrated), widget.device_combo.currentText())]
    np.testing.assert_array_equal(labels, segment(viewer.layers["nuclei brightfield"].data, model=model, flips=False))
    assert (prob[labels > 0] > 0.6).all()
    # a multi-class model has no threshold or largest object to set
    widget.add_model_source(untrained_checkpoint(tmp_path / "three.safetensors", num_classes=3))
    assert not widget.threshold_spin.isEnabled() and not widget.largest_check.isEnabled()
    assert widget.inference_choices() == {"flips": False}


def _alien_image():
    """Saturated blue with a little noise: like none of the shipped models' training images."""
    rng = np.random.default_rng(0)
    blue = np.stack([np.full((200, 240), 20.0), np.tile(np.linspace(0, 120, 240), (200, 1)),
                     np.full((200, 240), 230.0)], -1)
    return np.clip(blue + rng.normal(0, 10, blue.shape), 0, 255).astype(np.uint8)


def test_the_model_trained_on_images_like_the_opened_one_is_suggested_and_selected(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    widget = SegmentWidget(viewer)
    viewer.window.add_dock_widget(widget)
    assert widget.suggestion.text() == ""
    viewer.open_sample("napari-medrwkv", "fluorescence")
    assert widget.model_combo.currentText() == "rwkv_unet_t-dsb2018"      # not the first in the list (busi)
    assert "Suggested for this image: rwkv_unet_t-dsb2018" in widget.suggestion.text()
    # An image unlike any training set: said so, and the model stays as it was.
    viewer.add_image(_alien_image(), name="alien")
    widget.image_combo.setCurrentText("alien")
    assert "None of these models" in widget.suggestion.text()
    assert "fine-tune it on a few corrected slices" in widget.suggestion.text()          # what to do instead
    assert widget.model_combo.currentText() == "rwkv_unet_t-dsb2018"
    # Once the user picks a model, later images only get the suggestion in words.
    index = widget.model_combo.findText("rwkv_unet_t-busi")
    widget.model_combo.setCurrentIndex(index)
    widget.model_combo.activated.emit(index)
    viewer.open_sample("napari-medrwkv", "brightfield")
    widget.image_combo.setCurrentText("nuclei brightfield")
    assert widget.model_combo.currentText() == "rwkv_unet_t-busi"
    assert "Suggested for this image: rwkv_unet_t-dsb2018" in widget.suggestion.text()


def test_suggestion_uses_the_current_slice_of_a_stack(make_napari_viewer, shared_data):
    from napari_medrwkv.engine.datasets import find_pairs
    from napari_medrwkv.engine.imageio import read_image
    polyp = read_image(find_pairs(shared_data / "kvasir-seg", "test")[0].image)
    ultrasound = read_image(find_pairs(shared_data / "busi", "test")[0].image)
    grey_polyp = polyp.mean(-1).astype(np.uint8)[:200, :200]
    stack = np.stack([ultrasound[:200, :200], grey_polyp])
    viewer = make_napari_viewer()
    widget = SegmentWidget(viewer)
    viewer.add_image(polyp, name="polyp")
    assert widget.model_combo.currentText() == "rwkv_unet_t-kvasir"
    viewer.dims.set_current_step(0, 0)
    viewer.add_image(stack, name="stack")
    viewer.dims.set_current_step(0, 0)
    widget.image_combo.setCurrentText("polyp")
    widget.image_combo.setCurrentText("stack")
    assert widget.model_combo.currentText() == "rwkv_unet_t-busi"


def test_each_model_in_the_menu_says_what_it_finds_learnt_from_and_scored(make_napari_viewer):
    from qtpy.QtCore import Qt
    widget = SegmentWidget(make_napari_viewer())
    tips = {widget.model_combo.itemText(i): widget.model_combo.itemData(i, Qt.ItemDataRole.ToolTipRole)
            for i in range(widget.model_combo.count())}
    assert tips["rwkv_unet_t-busi"].startswith("finds lesion; trained on busi (train split); test Dice 0.765")
    assert "finds polyp; trained on kvasir-seg" in tips["rwkv_unet_t-kvasir"]
    assert "finds nucleus" in tips["rwkv_unet_t-dsb2018"]


def test_a_model_fine_tuned_on_images_like_this_one_is_suggested_over_the_shipped_ones(make_napari_viewer, tmp_path):
    from napari_medrwkv.plugin import session
    from napari_medrwkv.engine.appearance import appearance_profile
    from napari_medrwkv.engine.checkpoint import read_info, write_info
    viewer = make_napari_viewer()
    widget = SegmentWidget(viewer)
    viewer.add_image(_alien_image(), name="alien")
    assert "None of these models" in widget.suggestion.text()
    # As the Fine-tune widget leaves it: a checkpoint trained on slices like this one, registered.
    tuned = untrained_checkpoint(tmp_path / "tuned on blue.safetensors")
    info = read_info(tuned)
    info.training["appearance"] = appearance_profile([_alien_image()[10:150, 20:200]])
    write_info(tuned, info)
    try:
        session.register(tuned)
        viewer.add_image(_alien_image()[::-1], name="alien 2")
        widget.image_combo.setCurrentText("alien 2")
        assert widget.suggestion.text() == "Suggested for this image: tuned on blue.safetensors (trained on images like it)."
        assert widget.model_combo.currentText() == tuned
    finally:
        session.clear()


def test_new_layers_leave_the_chosen_image_model_and_settings_alone(make_napari_viewer, qtbot, shared_data):
    from napari_medrwkv.engine.datasets import find_pairs
    from napari_medrwkv.engine.imageio import read_image
    viewer = make_napari_viewer()
    widget = SegmentWidget(viewer)
    viewer.add_image(read_image(find_pairs(shared_data / "kvasir-seg", "test")[0].image), name="polyp")
    viewer.open_sample("napari-medrwkv", "fluorescence")
    widget.image_combo.setCurrentText("nuclei fluorescence")
    assert widget.model_combo.currentText() == "rwkv_unet_t-dsb2018"
    widget.threshold_spin.setValue(0.4)
    seen = []
    widget.model_combo.currentTextChanged.connect(seen.append)
    widget.run()
    qtbot.waitUntil(lambda: widget.worker is None, timeout=60000)
    # The labels layer it added refreshed the image list; nothing the user set moved meanwhile.
    assert "nuclei fluorescence [rwkv_unet_t-dsb2018]" in viewer.layers
    assert widget.image_combo.currentText() == "nuclei fluorescence"
    assert seen == [] and widget.threshold_spin.value() == 0.4


def test_a_model_fine_tuned_elsewhere_leaves_the_chosen_model_and_settings_alone(make_napari_viewer, tmp_path):
    from napari_medrwkv.plugin import session
    viewer = make_napari_viewer()
    widget = SegmentWidget(viewer)
    viewer.open_sample("napari-medrwkv", "fluorescence")
    widget.threshold_spin.setValue(0.4)
    widget.flips_check.setChecked(True)
    try:
        session.register(untrained_checkpoint(tmp_path / "tuned.safetensors"))     # as the Fine-tune widget does
        assert widget.model_combo.findText(str(tmp_path / "tuned.safetensors")) >= 0
        assert widget.model_combo.currentText() == "rwkv_unet_t-dsb2018"
        assert widget.threshold_spin.value() == 0.4 and widget.flips_check.isChecked()
    finally:
        session.clear()


# --------------------------------------------------------------------------- replacing labels
def _answer_reviewed_question(qtbot, choice, seen):
    """Click ``choice`` ('skip', 'replace', 'new') in the "Replace reviewed labels?" box when it opens."""
    from qtpy.QtCore import Qt, QTimer
    from qtpy.QtWidgets import QAbstractButton, QApplication, QMessageBox

    def click():
        box = QApplication.activeModalWidget()
        if isinstance(box, QMessageBox) and box.windowTitle() == "Replace reviewed labels?":
            seen.append(box.text())
            qtbot.mouseClick(box.findChild(QAbstractButton, f"reviewed-{choice}"), Qt.MouseButton.LeftButton)
    timer = QTimer()
    timer.timeout.connect(click)
    timer.start(50)
    return timer


def _stack_segmented(widget, qtbot):
    viewer = widget.viewer
    stack = np.random.default_rng(2).integers(0, 255, (3, 48, 64), dtype=np.uint8)
    viewer.add_image(stack, name="stack")
    widget.image_combo.setCurrentText("stack")
    widget.scope_combo.setCurrentText("all slices")
    widget.threshold_spin.setValue(0.5)
    widget.run()
    _wait(widget, qtbot)
    return viewer.layers["stack [nuclei-test]"]


def _paint(labels, z, label=9):
    """A brush stroke as napari records it (one undo step)."""
    labels.brush_size = 9
    labels.paint((z, 20, 30), label, refresh=True)


def test_replacing_edited_labels_is_one_undo_step(widget, qtbot, monkeypatch):
    labels = _stack_segmented(widget, qtbot)
    _paint(labels, 1)
    edited = labels.data.copy()
    monkeypatch.setattr(segment_widget.QMessageBox, "question",
                        lambda *a, **k: segment_widget.QMessageBox.StandardButton.Yes)
    widget.threshold_spin.setValue(0.53)               # the untrained model's probabilities: 0.51-0.55
    widget.run()
    _wait(widget, qtbot)
    assert not np.array_equal(labels.data, edited) and "Ctrl+Z" in widget.status.text()
    labels.undo()
    assert np.array_equal(labels.data, edited)             # the whole replacement undone at once
    labels.undo()
    assert not (labels.data == 9).any()                    # and the stroke before it


def test_reviewed_slices_are_kept_unless_the_user_says_replace(widget, qtbot):
    from napari_medrwkv.plugin import review
    labels = _stack_segmented(widget, qtbot)
    _paint(labels, 1)
    review.set_reviewed(labels, 1)
    before = labels.data.copy()
    asked = []
    widget.threshold_spin.setValue(0.53)                   # every slice changes (probabilities 0.51-0.55)
    timer = _answer_reviewed_question(qtbot, "skip", asked)
    widget.run()
    _wait(widget, qtbot)
    assert len(asked) == 1 and "Slice(s) 1 are marked reviewed" in asked[0]
    assert np.array_equal(labels.data[1], before[1]) and review.reviewed(labels) == [1]
    assert not np.array_equal(labels.data[0], before[0])   # the unreviewed slices took the new result
    assert "reviewed slice(s) 1 kept" in widget.status.text()
    timer.stop()

    widget.threshold_spin.setValue(0.52)
    timer = _answer_reviewed_question(qtbot, "replace", asked)
    widget.run()
    _wait(widget, qtbot)
    timer.stop()
    assert len(asked) == 2 and not np.array_equal(labels.data[1], before[1])
    assert review.reviewed(labels) == []                   # nobody reviewed the new labels
    labels.undo()
    assert np.array_equal(labels.data[1], before[1])


def test_a_reviewed_image_is_asked_about_even_without_edits(widget, qtbot):
    # Mark reviewed, change the threshold, Segment: the labels must not change silently.
    from napari_medrwkv.plugin import review
    viewer = widget.viewer
    viewer.add_image(np.random.default_rng(3).integers(0, 255, (48, 64), dtype=np.uint8), name="flat")
    widget.image_combo.setCurrentText("flat")
    widget.run()
    _wait(widget, qtbot)
    labels = viewer.layers["flat [nuclei-test]"]
    review.set_reviewed(labels, 0)
    kept = labels.data.copy()
    asked = []
    widget.threshold_spin.setValue(0.53)
    timer = _answer_reviewed_question(qtbot, "new", asked)
    widget.run()
    _wait(widget, qtbot)
    timer.stop()
    assert len(asked) == 1 and "It is marked reviewed" in asked[0]
    assert np.array_equal(labels.data, kept) and review.reviewed(labels) == [0]
    assert "flat [nuclei-test] (2)" in viewer.layers
    assert viewer.layers.selection.active is viewer.layers["flat [nuclei-test] (2)"]   # paint tools at hand


def test_labels_of_another_shape_under_the_result_name_are_kept(widget, qtbot):
    viewer = widget.viewer
    viewer.add_image(np.random.default_rng(4).integers(0, 255, (48, 64), dtype=np.uint8), name="img")
    mine = viewer.add_labels(np.full((10, 10), 3, dtype=np.int32), name="img [nuclei-test]")
    widget.image_combo.setCurrentText("img")
    widget.run()
    _wait(widget, qtbot)
    assert mine in viewer.layers and (mine.data == 3).all()
    assert viewer.layers["img [nuclei-test] (2)"].data.shape == (48, 64)


def test_napari_closing_stops_a_segmentation_at_once(make_napari_viewer, checkpoint, qtbot):
    import time
    viewer = make_napari_viewer()
    widget = SegmentWidget(viewer)
    viewer.window.add_dock_widget(widget)
    widget.add_model_source(checkpoint)
    viewer.add_image(np.random.default_rng(5).integers(0, 255, (40, 256, 256), dtype=np.uint8), name="big")
    widget.image_combo.setCurrentText("big")
    widget.scope_combo.setCurrentText("all slices")
    widget.run()
    qtbot.waitUntil(lambda: widget.progress_bar.value() > 0, timeout=60000)
    start = time.monotonic()
    viewer.close()
    assert not widget.worker.is_running and time.monotonic() - start < 10


# --------------------------------------------------------------------------- which image
def _click_layer(viewer, qtbot, name):
    """Select a layer by clicking its row in napari's layer list."""
    from qtpy.QtCore import Qt
    view = viewer.window._qt_viewer.layers
    model = view.model()
    row = next(r for r in range(model.rowCount()) if model.index(r, 0).data(Qt.ItemDataRole.DisplayRole) == name)
    rect = view.visualRect(model.index(row, 0))
    qtbot.mouseClick(view.viewport(), Qt.MouseButton.LeftButton, pos=rect.center())


def test_the_image_menu_follows_the_layer_just_opened_or_selected(make_napari_viewer, checkpoint, qtbot, tmp_path):
    # Pressing Segment used to re-segment the previous image after the user opened or selected another.
    from qtpy.QtCore import Qt
    from napari_medrwkv.engine.imageio import write_labels
    viewer = make_napari_viewer(show=True)
    widget = SegmentWidget(viewer)
    viewer.window.add_dock_widget(widget)
    widget.add_model_source(checkpoint)
    viewer.add_image(np.random.default_rng(0).integers(0, 255, (48, 64), dtype=np.uint8), name="first")
    assert widget.image_combo.currentText() == "first"
    path = write_labels(tmp_path / "opened.tif", np.random.default_rng(1).integers(0, 255, (40, 56), dtype=np.uint8))
    viewer.open(str(path))                                  # File > Open
    assert widget.image_combo.currentText() == "opened"
    _click_layer(viewer, qtbot, "first")
    assert viewer.layers.selection.active.name == "first" and widget.image_combo.currentText() == "first"
    widget.probability_check.setChecked(True)
    qtbot.mouseClick(widget.run_button, Qt.MouseButton.LeftButton)
    _wait(widget, qtbot)
    assert "first [nuclei-test]" in viewer.layers and "opened [nuclei-test]" not in viewer.layers
    # Neither the result nor its probability layer moves the choice; selecting the opened image does,
    # and so does selecting labels that annotate an image.
    assert widget.image_combo.currentText() == "first"
    assert widget.image_combo.findText("first [nuclei-test] probability") < 0
    _click_layer(viewer, qtbot, "opened")
    assert widget.image_combo.currentText() == "opened"
    _click_layer(viewer, qtbot, "first [nuclei-test]")
    assert widget.image_combo.currentText() == "first"


def test_the_model_menu_lists_no_model_that_needs_clicks(widget):
    from napari_medrwkv.engine.model import list_automatic, list_shipped, read_model_info
    items = [widget.model_combo.itemText(i) for i in range(widget.model_combo.count())]
    for name in list_shipped():
        assert (name in items) == (name in list_automatic()) == (read_model_info(name).prompt_channels == 0)


def test_the_tile_control_says_what_auto_chooses_and_segment_tiles_so(widget, qtbot, monkeypatch):
    from napari_medrwkv.engine import tiling
    viewer = widget.viewer
    viewer.add_image(np.random.default_rng(3).integers(0, 255, (700, 900), dtype=np.uint8), name="slide")
    widget.image_combo.setCurrentText("slide")
    widget.settings_section.set_expanded(True)
    assert widget.tile_spin.text() == "auto"
    assert "whole plane in one pass" in widget.tile_plan.text()
    # A machine with little memory: auto tiles, and says how; Segment runs exactly those tiles.
    monkeypatch.setenv(tiling.BUDGET_ENV, str(300 * 300 * tiling.bytes_per_pixel("ds_vrwkv_t") / 2**20))
    widget.tile_spin.setValue(256)
    widget.tile_spin.setValue(0)
    plan = tiling.plan_tiles((700, 900), "ds_vrwkv_t")
    assert plan.count > 1 and widget.tile_plan.text() == plan.reason
    ticks = []
    widget._relay.tiles.connect(lambda done, total: ticks.append(total))
    widget.run()
    _wait(widget, qtbot)
    assert ticks and set(ticks) == {plan.count}
    widget.tile_spin.setValue(512)
    assert "512 px (chosen)" in widget.tile_plan.text()
