"""The whole loop through the three widgets, as a user does it: segment a stack, correct two
slices, mark them reviewed, fine-tune, re-segment the rest (pytest-qt under Xvfb)."""
import numpy as np
import pytest

from conftest import untrained_checkpoint

pytest.importorskip("napari")

from napari_medrwkv.plugin import finetune_widget, review, session  # noqa: E402
from napari_medrwkv.plugin.correct_widget import CorrectWidget  # noqa: E402
from napari_medrwkv.plugin.finetune_widget import FineTuneWidget  # noqa: E402
from napari_medrwkv.plugin.segment_widget import SegmentWidget  # noqa: E402
from napari_medrwkv.engine.checkpoint import read_info  # noqa: E402

TIMEOUT = 180000


@pytest.fixture(autouse=True)
def fresh_session():
    session.clear()
    yield
    session.clear()


def test_segment_correct_review_finetune_resegment(make_napari_viewer, qtbot, tmp_path, monkeypatch):
    viewer = make_napari_viewer()
    image, truth = viewer.open_sample("napari-medrwkv", "fluorescence")
    img, gt = image.data, truth.data
    viewer.layers.remove(truth)
    viewer.add_image(np.stack([img, img[:, ::-1], img[::-1], img[::-1, ::-1]]), name="stack")
    base = untrained_checkpoint(tmp_path / "base.safetensors")

    # 1. Segment every slice.
    segment = SegmentWidget(viewer)
    viewer.window.add_dock_widget(segment)
    segment.add_model_source(base)
    segment.image_combo.setCurrentText("stack")
    segment.scope_combo.setCurrentText("all slices")
    segment.run()
    qtbot.waitUntil(lambda: segment.worker is None, timeout=TIMEOUT)
    labels = viewer.layers["stack [base]"]
    assert labels.data.shape == (4, 256, 256)

    # 2. Correct slices 0 and 1: paint the truth in (as brush strokes would), clean up, review.
    correct = CorrectWidget(viewer)
    viewer.window.add_dock_widget(correct)
    correct.labels_combo.setCurrentText(labels.name)
    truths = {0: gt, 1: gt[:, ::-1]}
    for z, target in truths.items():
        viewer.dims.set_current_step(0, z)
        diff = np.nonzero(labels.data[z] != (target > 0))
        labels.data_setitem((np.full(diff[0].shape, z),) + diff, (target > 0)[diff].astype(labels.data.dtype))
        correct.remove_small()
        correct.mark_button.click()
    assert review.reviewed(labels) == [0, 1]
    corrected = labels.data[:2].copy()
    labels.data[2:] = 7          # stale slices: a value the binary model never writes

    # 3. Fine-tune on the two reviewed slices.
    finetune = FineTuneWidget(viewer)
    viewer.window.add_dock_widget(finetune)
    finetune.refresh_pairs()
    assert "Reviewed pairs: 2" in finetune.pairs_label.text()
    finetune.add_model_source(base)
    finetune.epochs_spin.setValue(2)
    finetune.patch_spin.setValue(64)
    finetune.batch_spin.setValue(2)
    finetune.samples_spin.setValue(4)
    finetune.device_combo.setCurrentText("cpu")
    tuned = tmp_path / "tuned.safetensors"
    finetune.output_edit.setText(str(tuned))
    finetune.run()
    qtbot.waitUntil(lambda: finetune.worker is None, timeout=TIMEOUT)
    assert tuned.exists() and read_info(tuned).training["base"].endswith("base.safetensors")
    assert str(tuned) in session.registered()
    assert str(tuned) in [segment.model_combo.itemText(i) for i in range(segment.model_combo.count())]
    assert "before" in finetune.result_label.text() and "after" in finetune.result_label.text()

    # 4. Re-segment the unreviewed slices with the tuned model; reviewed ones stay as corrected.
    monkeypatch.setattr(finetune_widget.QMessageBox, "question",
                        lambda *a, **k: finetune_widget.QMessageBox.StandardButton.Yes)
    finetune.resegment_button.click()
    qtbot.waitUntil(lambda: finetune.worker is None, timeout=TIMEOUT)
    assert np.array_equal(labels.data[:2], corrected)
    assert set(np.unique(labels.data[2:])) <= {0, 1}


def test_checkpoint_with_other_classes_is_a_notification(make_napari_viewer, qtbot, tmp_path, monkeypatch):
    errors = []
    monkeypatch.setattr(finetune_widget, "show_error", errors.append)
    viewer = make_napari_viewer()
    image, truth = viewer.open_sample("napari-medrwkv", "fluorescence")   # instance ids up to ~99
    review.link(truth, image.name)
    review.set_reviewed(truth, 0)
    finetune = FineTuneWidget(viewer)
    viewer.window.add_dock_widget(finetune)
    finetune.add_model_source(untrained_checkpoint(tmp_path / "three.safetensors", num_classes=3))
    finetune.epochs_spin.setValue(1)
    finetune.patch_spin.setValue(64)
    finetune.device_combo.setCurrentText("cpu")
    finetune.output_edit.setText(str(tmp_path / "never.safetensors"))
    finetune.run()
    qtbot.waitUntil(lambda: finetune.worker is None, timeout=TIMEOUT)
    assert errors and "class id" in errors[-1] and "3 classes" in errors[-1]
    assert not (tmp_path / "never.safetensors").exists()
