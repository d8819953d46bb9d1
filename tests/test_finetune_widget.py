"""The Fine-tune widget in a real napari viewer: reviewed pairs -> fine-tune -> re-segment (pytest-qt, Xvfb).

Training is kept to a few steps on 64-pixel patches with the smallest model.
"""
import numpy as np
import pytest

from conftest import untrained_checkpoint

pytest.importorskip("napari")

from napari_medrwkv.plugin import finetune_widget, review, session, training_curve  # noqa: E402
from napari_medrwkv.plugin.finetune_widget import FineTuneWidget, split_held_out, unreviewed_slices  # noqa: E402
from napari_medrwkv.plugin.review import user_edited  # noqa: E402
from napari_medrwkv.plugin.segment_widget import SegmentWidget  # noqa: E402
from napari_medrwkv.engine.checkpoint import read_info  # noqa: E402
from napari_medrwkv.engine.datasets import find_pairs  # noqa: E402

TIMEOUT = 120000


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return untrained_checkpoint(tmp_path_factory.mktemp("ckpt") / "base-test.safetensors")


@pytest.fixture(autouse=True)
def fresh_session():
    session.clear()
    yield
    session.clear()


@pytest.fixture
def errors(monkeypatch):
    seen = []
    monkeypatch.setattr(finetune_widget, "show_error", seen.append)
    return seen


def _tiny(widget, out, epochs=2, samples=4):
    widget.epochs_spin.setValue(epochs)
    widget.patch_spin.setValue(64)
    widget.batch_spin.setValue(2)
    widget.samples_spin.setValue(samples)
    widget.device_combo.setCurrentText("cpu")
    widget.output_edit.setText(str(out))


@pytest.fixture
def loop(make_napari_viewer, checkpoint):
    """The fluorescence sample (2-D, reviewed) and a 3-slice stack with slices 0 and 1 reviewed,
    slice 2 an unreviewed stale prediction (all 7)."""
    viewer = make_napari_viewer()
    image, truth = viewer.open_sample("napari-medrwkv", "fluorescence")
    review.link(truth, image.name)
    review.set_reviewed(truth, 0)
    img, gt = image.data, truth.data
    viewer.add_image(np.stack([img, img[:, ::-1], img[::-1]]), name="stack")
    stack_labels = viewer.add_labels(np.stack([gt, gt[:, ::-1], np.full_like(gt, 7)]), name="stack labels")
    review.link(stack_labels, "stack")
    review.set_reviewed(stack_labels, 0)
    review.set_reviewed(stack_labels, 1)
    widget = FineTuneWidget(viewer)
    viewer.window.add_dock_widget(widget)
    widget.add_model_source(checkpoint)
    return widget


def _wait(widget, qtbot):
    qtbot.waitUntil(lambda: widget.worker is None, timeout=TIMEOUT)


def test_hold_out_is_deterministic():
    assert split_held_out(2) == ([0, 1], [])
    train, held = split_held_out(3)
    assert len(held) == 1 and sorted(train + held) == [0, 1, 2]
    assert split_held_out(10) == split_held_out(10) and len(split_held_out(10)[1]) == 2


def _kept_marker_rows(curve):
    """Rows of the chart's image with pixels of the kept-weights colour, right of the legend."""
    image = curve.grab().toImage()
    kept = np.array(curve.KEPT.getRgb()[:3])

    def near(pixel):            # Xvfb may run at 16-bit depth, which rounds colours
        return np.abs(np.array([(pixel >> 16) & 255, (pixel >> 8) & 255, pixel & 255]) - kept).max() <= 10
    return sorted({y for y in range(image.height()) for x in range(image.width() // 2, image.width())
                   if near(image.pixel(x, y))})


def test_the_chart_marks_the_dice_of_the_weights_kept(qtbot):
    # A blend of the best epoch and the start (or the start itself) is none of the epochs'
    # points: the chart shows its Dice as a diamond at the right edge, higher for a higher Dice.
    curve = training_curve.TrainingCurve()
    qtbot.addWidget(curve)
    curve.resize(400, 200)
    for loss in np.linspace(1.0, 0.3, 20):
        curve.add_loss(loss)
        if len(curve.losses) % 5 == 0:
            curve.add_val_dice(0.2 + len(curve.losses) / 50)
    curve.set_baseline(0.1)
    assert _kept_marker_rows(curve) == []
    curve.set_kept(0.8)
    high = _kept_marker_rows(curve)
    curve.set_kept(0.3)
    low = _kept_marker_rows(curve)
    assert high and low and max(low) > max(high) + 0.3 * curve.height()
    curve.clear()
    assert curve.kept is None and _kept_marker_rows(curve) == []


def test_fine_tune_registers_saves_and_resegments_only_unreviewed_slices(loop, qtbot, tmp_path, monkeypatch,
                                                                         errors, checkpoint):
    widget, viewer = loop, loop.viewer
    assert widget.pairs_label.text() == "Reviewed pairs: 3 (from 2 layers)"
    segment = SegmentWidget(viewer)                       # already open: must pick up the new model
    viewer.window.add_dock_widget(segment)
    segment.add_model_source(checkpoint)
    out = tmp_path / "models" / "tuned.safetensors"        # the folder is created on saving
    _tiny(widget, out)
    widget.run()
    assert not widget.run_button.isEnabled() and widget.cancel_button.isEnabled()
    _wait(widget, qtbot)
    assert not errors, errors

    assert out.is_file()
    training = read_info(out).training
    assert training["base"] == checkpoint and len(training["history"]) == 2 and not training["cancelled"]
    assert "napari Fine-tune widget" in training["command"] and "held out: " in training["command"]
    # the widget's settings reach the checkpoint's provenance (lr: the few-shot default)
    from napari_medrwkv.engine.defaults import FEW_SHOT
    assert training["config"]["patch_size"] == 64 and training["config"]["lr"] == pytest.approx(FEW_SHOT["lr"])
    # a trained start: the best epoch blended with it, or the start itself, and the status says which
    assert training["config"]["blend"] == FEW_SHOT["blend"] == 0.75
    # (or the epoch alone, when the blend scored lower on the held-out pair)
    if training["best_epoch"] == 0:
        said, blend = "no epoch beat the starting model", 1.0
    elif training["blend_val_dice"] < widget.result.best_val_dice:
        said, blend = f"kept epoch {training['best_epoch']} (the best); its blend with the starting model " \
                      f"scored lower ({training['blend_val_dice']:.2f})", 1.0
    else:
        said, blend = f"kept epoch {training['best_epoch']} (the best), blended with the starting model " \
                      "(75% the epoch's)", 0.75
    assert said in widget.status.text() and training["blend"] == blend
    assert session.registered() == [str(out)]
    items = [segment.model_combo.itemText(i) for i in range(segment.model_combo.count())]
    assert str(out) in items and items[-1] == finetune_widget.BROWSE
    assert segment.model_combo.currentText() == checkpoint     # the user's choice is kept
    assert widget.model_combo.currentText() == str(out)        # the next round starts from it
    text = widget.result_label.text()
    assert text.startswith("Dice on 1 held-out reviewed pair (one image") and " → after " in text
    # "before" and the epochs are scored as "after" is: what is kept never reads worse than the start
    before, after = (float(t) for t in text.split("before ")[1].split(" → after "))
    assert after >= before and after == float(f"{widget.result.best_val_dice:.2f}")
    # the start is measured once, by train, and that one score is the label's and the chart's "before"
    assert before == float(f"{widget.result.start_val_dice:.2f}")
    assert widget.curve.baseline == widget.result.start_val_dice
    assert widget.curve.kept == widget.result.best_val_dice
    assert len(widget.curve.losses) == 4 and len(widget.curve.val_points) == 2
    assert widget.curve.baseline is not None
    assert widget.progress_bar.value() == widget.progress_bar.maximum()
    assert widget.resegment_button.isEnabled()

    truth = viewer.layers["nuclei fluorescence ground truth"]
    stack = viewer.layers["stack labels"]
    kept_truth, kept_stack = truth.data.copy(), stack.data[:2].copy()
    assert [(layer.name, indices) for layer, _, indices in unreviewed_slices(viewer.layers)] == \
        [("stack labels", [2])]
    asked = []
    monkeypatch.setattr(finetune_widget.QMessageBox, "question",
                        lambda *a, **k: asked.append(a) or finetune_widget.QMessageBox.StandardButton.Yes)
    widget.resegment()
    _wait(widget, qtbot)
    assert len(asked) == 1 and "1 unreviewed slice" in asked[0][2]
    assert not errors, errors
    assert truth.data.tobytes() == kept_truth.tobytes()
    assert stack.data[:2].tobytes() == kept_stack.tobytes()
    assert not (stack.data[2] == 7).any() and set(np.unique(stack.data[2])) <= {0, 1}
    assert not user_edited(stack)
    assert "Re-segmented 1 unreviewed slice" in widget.status.text()


def test_a_fine_tuning_that_only_hurts_gives_the_starting_model_back(loop, qtbot, tmp_path, errors):
    # The shipped nuclei model does well on the nuclei samples; at the widget's largest learning
    # rate two epochs wreck it, so the held-out pair keeps the start, and the widget says so.
    widget = loop
    widget.add_model_source("rwkv_unet_t-dsb2018")
    out = tmp_path / "hurt.safetensors"
    _tiny(widget, out)
    widget.lr_spin.setValue(widget.lr_spin.maximum())
    widget.run()
    _wait(widget, qtbot)
    assert not errors, errors
    assert widget.result.best_epoch == 0 and widget.result.start_val_dice > 0.5
    assert "no epoch beat the starting model on 1 held-out reviewed pair" in widget.status.text()
    # The before/after Dice says what it rests on: one held-out image here.
    assert widget.result_label.text().startswith("Dice on 1 held-out reviewed pair (one image: a rough guide")
    assert "Re-segment" not in widget.status.text()          # the same model would change nothing
    before, after = widget.result_label.text().split("before ")[1].split(" → after ")
    assert before == after
    assert read_info(out).training["best_epoch"] == 0


def test_cancel_keeps_and_saves_the_best_model_so_far(loop, qtbot, tmp_path, errors):
    widget = loop
    out = tmp_path / "cancelled.safetensors"
    _tiny(widget, out, epochs=0, samples=400)               # minutes of work unless cancelled
    widget.run()
    qtbot.waitUntil(lambda: len(widget.curve.losses) >= 1, timeout=TIMEOUT)
    running = widget.worker
    widget.run()                                             # a second click starts nothing
    assert widget.worker is running
    widget.cancel()
    _wait(widget, qtbot)
    assert not errors, errors
    assert out.is_file()
    training = read_info(out).training
    assert training["cancelled"] and len(training["history"]) >= 1
    assert "Cancelled" in widget.status.text()
    assert session.registered() == [str(out)]
    assert widget.run_button.isEnabled()


def test_save_reviewed_pairs_as_training_folder(loop, tmp_path, monkeypatch, errors):
    widget = loop
    folder = tmp_path / "reviewed"
    monkeypatch.setattr(finetune_widget.QFileDialog, "getExistingDirectory", lambda *a, **k: str(folder))
    widget.save_pairs()
    assert not errors, errors
    assert sorted(p.stem for p in find_pairs(folder)) == \
        ["nuclei_fluorescence_z0000", "stack_z0000", "stack_z0001"]
    assert sorted(p.name for p in (folder / "images").iterdir()) == sorted(p.name for p in (folder / "masks").iterdir())
    widget.save_pairs()                                      # the files exist now: an error, nothing overwritten
    assert len(errors) == 1 and "already exists" in errors[0]


def test_failures_are_notifications(make_napari_viewer, errors, qtbot, tmp_path):
    viewer = make_napari_viewer()
    viewer.open_sample("napari-medrwkv", "fluorescence")     # labels, but none linked or reviewed
    widget = FineTuneWidget(viewer)
    viewer.window.add_dock_widget(widget)
    assert widget.pairs_label.text() == "Reviewed pairs: 0 (from 0 layers)"
    widget.run()
    assert widget.worker is None and "Nothing to learn from" in errors[-1]
    widget.save_pairs()
    assert "No reviewed pairs" in errors[-1]

    truth = viewer.layers["nuclei fluorescence ground truth"]
    review.link(truth, "nuclei fluorescence")
    review.set_reviewed(truth, 0)
    widget.refresh_button.click()
    assert widget.pairs_label.text() == "Reviewed pairs: 1 (from 1 layer)"
    widget.add_model_source(str(tmp_path / "no-such-model.safetensors"))
    widget.output_edit.setText(str(tmp_path / "out.safetensors"))
    widget.run()
    _wait(widget, qtbot)
    assert "no-such-model.safetensors" in errors[-1] and "Failed" in widget.status.text()
    assert not (tmp_path / "out.safetensors").exists() and session.registered() == []

    widget.output_edit.setText(str(tmp_path / "out.pt"))
    widget.run()
    assert widget.worker is None and ".safetensors" in errors[-1]


def test_resegmenting_is_one_undo_step_per_layer(loop, qtbot, tmp_path, monkeypatch, errors):
    widget = loop
    _tiny(widget, tmp_path / "tuned.safetensors", epochs=1)
    widget.run()
    _wait(widget, qtbot)
    stack = widget.viewer.layers["stack labels"]
    stale = stack.data.copy()
    monkeypatch.setattr(finetune_widget.QMessageBox, "question",
                        lambda *a, **k: finetune_widget.QMessageBox.StandardButton.Yes)
    widget.resegment()
    _wait(widget, qtbot)
    assert not errors, errors
    assert not (stack.data[2] == 7).any() and "Ctrl+Z" in widget.status.text()
    stack.undo()
    assert np.array_equal(stack.data, stale)


def test_save_as_answers_for_one_round_only(loop, qtbot, tmp_path, monkeypatch, errors):
    from qtpy.QtCore import Qt
    # A path chosen with Save as… (whose dialog asked about replacing) must not be replaced by the
    # next round without a question.
    widget = loop
    out = tmp_path / "chosen.safetensors"
    _tiny(widget, out, epochs=1)
    monkeypatch.setattr(finetune_widget.QFileDialog, "getSaveFileName", lambda *a, **k: (str(out), ""))
    qtbot.mouseClick(widget.output_button, Qt.MouseButton.LeftButton)
    widget.run()
    _wait(widget, qtbot)
    assert out.is_file() and not errors, errors
    first = out.read_bytes()
    asked = []
    monkeypatch.setattr(finetune_widget.QMessageBox, "question",
                        lambda *a, **k: asked.append(a[1]) or finetune_widget.QMessageBox.StandardButton.No)
    widget.run()
    _wait(widget, qtbot)
    assert asked == ["Replace checkpoint?"] and out.read_bytes() == first


def test_closing_napari_during_fine_tuning_stops_it_and_keeps_the_best_so_far(loop, qtbot, tmp_path, errors):
    import time
    widget = loop
    out = tmp_path / "closing.safetensors"
    _tiny(widget, out, epochs=0, samples=400)               # minutes of work unless stopped
    widget.run()
    qtbot.waitUntil(lambda: len(widget.curve.losses) >= 1, timeout=TIMEOUT)
    start = time.monotonic()
    widget.viewer.close()
    assert not widget.worker.is_running and time.monotonic() - start < 20
    assert out.is_file() and read_info(out).training["cancelled"]       # written before the window went


def test_quitting_by_hand_asks_first(loop, qtbot, tmp_path, monkeypatch):
    from qtpy.QtGui import QCloseEvent
    from napari_medrwkv.plugin import qt_helpers

    class ClosedByTheUser(QCloseEvent):               # what the window system sends for the X button
        def spontaneous(self):
            return True

    widget = loop
    _tiny(widget, tmp_path / "kept-running.safetensors", epochs=0, samples=400)
    widget.run()
    qtbot.waitUntil(lambda: widget.worker is not None, timeout=TIMEOUT)
    window = widget.viewer.window._qt_window
    guard = next(child for child in window.children() if isinstance(child, qt_helpers._QuitGuard))
    asked = []
    monkeypatch.setattr(qt_helpers.QMessageBox, "question",
                        lambda *a, **k: asked.append(a[2]) or qt_helpers.QMessageBox.StandardButton.No)
    event = ClosedByTheUser()
    assert guard.eventFilter(window, event) and not event.isAccepted()     # "No": napari stays open
    assert len(asked) == 1 and "Fine-tune:" in asked[0] and widget.worker is not None
    widget.cancel()
    _wait(widget, qtbot)


@pytest.fixture
def slow_to_validate(make_napari_viewer, checkpoint):
    """Three reviewed 1024² slices (one held out, which takes about a second to validate on two cores)."""
    viewer = make_napari_viewer()
    image, truth = viewer.open_sample("napari-medrwkv", "fluorescence")
    img, gt = np.tile(image.data, (4, 4)), np.tile(truth.data, (4, 4))[:, :]
    size = min(img.shape[0], 1024), min(img.shape[1], 1024)
    img, gt = img[:size[0], :size[1]], gt[:size[0], :size[1]]
    viewer.add_image(np.stack([img, img[:, ::-1], img[::-1]]), name="big")
    labels = viewer.add_labels(np.stack([gt, gt[:, ::-1], gt[::-1]]), name="big labels")
    review.link(labels, "big")
    for index in range(3):
        review.set_reviewed(labels, index)
    review.set_reviewed(truth, 0, False)
    widget = FineTuneWidget(viewer)
    viewer.window.add_dock_widget(widget)
    widget.add_model_source(checkpoint)
    return widget


def _progress_log(widget):
    """Every TrainProgress the worker reports, in order (the widget's own relay signal)."""
    seen = []
    widget._relay.progressed.connect(seen.append)
    return seen


def test_cancel_ends_at_once_and_keeps_what_was_validated(slow_to_validate, qtbot, tmp_path, errors):
    # Cancel used to validate the epoch cut short, then the blend, then save: two validations, 3 s
    # on a quiet machine.  Now it keeps the weights already validated (here the start) and saves.
    # Under 1 s on a quiet machine; on a loaded one, well under the one validation it measured.
    import time
    from qtpy.QtCore import Qt
    widget = slow_to_validate
    log = _progress_log(widget)
    out = tmp_path / "cancelled-fast.safetensors"
    _tiny(widget, out, epochs=0, samples=400)               # minutes of work unless cancelled
    qtbot.mouseClick(widget.run_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: len(widget.curve.losses) >= 2, timeout=TIMEOUT)
    validation = log[0].elapsed                             # epoch 0: the start's validation, timed from its start
    assert log[0].epoch == 0 and widget.curve.baseline is not None
    start = time.monotonic()
    qtbot.mouseClick(widget.cancel_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: widget.worker is None, timeout=TIMEOUT)
    took = time.monotonic() - start
    assert not errors, errors
    assert took < max(1.0, 0.5 * validation), f"Cancel took {took:.2f} s; one validation {validation:.2f} s"
    assert out.is_file() and read_info(out).training["cancelled"]
    assert widget.result.best_epoch == 0 and "Cancelled" in widget.status.text()


def test_the_time_budget_leaves_room_for_the_last_validations(slow_to_validate, qtbot, tmp_path, errors):
    # The last epoch's validation and the blend's used to start once the budget was spent (6-40%
    # over).  Training now stops while there is time for both, as long as the start's took.
    from qtpy.QtCore import Qt
    widget = slow_to_validate
    log = _progress_log(widget)
    budget = 6.0
    _tiny(widget, tmp_path / "budget.safetensors", epochs=0, samples=8)
    widget.minutes_spin.setValue(budget / 60)
    qtbot.mouseClick(widget.run_button, Qt.MouseButton.LeftButton)
    _wait(widget, qtbot)
    assert not errors, errors
    validation = log[0].elapsed
    steps = [p.elapsed for p in log if p.epoch >= 1 and p.val_dice is None]
    longest_step = max(b - a for a, b in zip(steps, steps[1:])) if len(steps) > 1 else steps[0] - validation
    # (The first step is taken whatever the time: on a loaded machine one validation may take most of the budget.)
    assert steps[-1] <= max(budget - 2 * validation, steps[0]) + longest_step + 0.1, (steps, validation)


def test_a_file_made_at_the_output_while_training_is_kept_and_the_model_saved_beside_it(loop, qtbot, tmp_path,
                                                                                        errors):
    # The output did not exist when the user pressed Fine-tune, so nobody agreed to replace it.
    widget = loop
    out = tmp_path / "mine.safetensors"
    theirs = b"a model another program saved there meanwhile"
    _tiny(widget, out, epochs=1)
    from qtpy.QtCore import Qt
    # Direct: in the training thread, while it trains (not queued until after it saved).
    widget._relay.progressed.connect(lambda p: out.exists() or out.write_bytes(theirs),
                                     Qt.ConnectionType.DirectConnection)
    widget.run()
    _wait(widget, qtbot)
    assert not errors, errors
    assert out.read_bytes() == theirs
    beside = tmp_path / "mine.1.safetensors"
    read_info(beside)
    assert str(beside) in widget.status.text() and "left as it is" in widget.status.text()
    assert session.registered() == [str(beside)]


def test_finished_weights_that_no_folder_takes_are_kept_until_saved_with_save_as(loop, qtbot, tmp_path, monkeypatch,
                                                                               errors, places_that_vanish):
    from qtpy.QtCore import Qt
    widget = loop
    usb, vanish = places_that_vanish
    _tiny(widget, usb / "m.safetensors", epochs=1)
    # Every place the weights could go vanishes while training runs (in the training thread).
    widget._relay.progressed.connect(vanish, Qt.ConnectionType.DirectConnection)
    widget.run()
    _wait(widget, qtbot)
    assert len(errors) == 1 and "could not be saved" in errors[0] and "Save as" in errors[0]
    assert "not be saved" in widget.busy()                 # quitting now would ask first
    assert session.registered() == []
    chosen = tmp_path / "rescued.safetensors"
    monkeypatch.setattr(finetune_widget.QFileDialog, "getSaveFileName", lambda *a, **k: (str(chosen), ""))
    widget._browse_output()
    assert read_info(chosen).training["history"]           # the trained run, with its provenance
    assert widget.busy() == "" and session.registered() == [str(chosen)]
    assert "Saved " + str(chosen) in widget.status.text()


def test_separate_touching_objects_trains_a_binary_base_into_an_instance_model(loop, qtbot, tmp_path, errors,
                                                                              checkpoint):
    widget = loop
    assert widget.instances_check.isEnabled() and not widget.instances_check.isChecked()
    widget.instances_check.setChecked(True)
    out = tmp_path / "instances.safetensors"
    _tiny(widget, out)
    widget.run()
    _wait(widget, qtbot)
    assert not errors, errors
    assert read_info(out).instances == "distance" and read_info(checkpoint).instances == ""
    assert "DSB object score" in widget.result_label.text()
    # An instance model as the base: the switch shows it and cannot be turned off.
    widget.add_model_source(str(out))
    assert widget.instances_check.isChecked() and not widget.instances_check.isEnabled()
    # A prompt-aware (click to fix) model cannot become one: the switch is off and closed.
    from napari_medrwkv.engine.interactive_train import promptable_start
    from napari_medrwkv.engine.checkpoint import save_checkpoint
    prompted = promptable_start(checkpoint)
    widget.add_model_source(str(save_checkpoint(prompted.net, tmp_path / "prompted.safetensors", prompted.info)))
    assert not widget.instances_check.isChecked() and not widget.instances_check.isEnabled()
