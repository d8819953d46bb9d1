"""Scans in napari (plugin/scan_io.py, pytest-qt under Xvfb): a scan opens with its spacing as the
layer's scale and its origin as translate; Segment keeps them on its result and segments the planes
the scanner acquired; labels save back onto the scan's grid."""
import numpy as np
import pytest

pytest.importorskip("napari")
sitk = pytest.importorskip("SimpleITK")
nib = pytest.importorskip("nibabel")

from test_scans import itk_affine, lps_image, nuclei_scan, volume  # noqa: E402

from napari_medrwkv.engine.scans import METADATA_KEY, read_scan, segment_scan  # noqa: E402
from napari_medrwkv.plugin.scan_io import get_reader  # noqa: E402


def open_scan(viewer, path):
    layers = viewer.open(str(path), plugin="napari-medrwkv")
    assert len(layers) == 1
    return layers[0]


def test_a_scan_opens_with_its_spacing_origin_and_geometry(make_napari_viewer, tmp_path):
    viewer = make_napari_viewer()
    data = volume()
    sitk.WriteImage(lps_image(data, spacing=(0.7, 0.9, 3.0), origin=(-40.0, 25.5, 100.25)), str(tmp_path / "a.nrrd"))
    layer = open_scan(viewer, tmp_path / "a.nrrd")
    assert layer.name == "a" and np.array_equal(layer.data, data)
    np.testing.assert_allclose(layer.scale, (3.0, 0.9, 0.7))
    np.testing.assert_allclose(layer.translate, (100.25, 25.5, -40.0))
    assert layer.metadata[METADATA_KEY]["slice_axis"] == 0
    assert get_reader(str(tmp_path / "photo.png")) is None


def test_a_scan_stored_ras_opens_as_the_same_layer_as_one_stored_lps(make_napari_viewer, tmp_path):
    viewer = make_napari_viewer()
    data = volume()
    sitk.WriteImage(lps_image(data), str(tmp_path / "lps.nrrd"))
    nz, ny, nx = data.shape
    spacing, origin = (0.7, 0.9, 3.0), np.array((-40.0, 25.5, 100.25))
    corner = origin + np.array(spacing) * [nx - 1, ny - 1, 0]
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = [-corner[0], -corner[1], corner[2]]
    nib.save(nib.Nifti1Image(np.ascontiguousarray(data[:, ::-1, ::-1].transpose(2, 1, 0)), affine),
             str(tmp_path / "ras.nii.gz"))
    lps, ras = open_scan(viewer, tmp_path / "lps.nrrd"), open_scan(viewer, tmp_path / "ras.nii.gz")
    assert np.array_equal(lps.data, ras.data)
    np.testing.assert_allclose(ras.scale, lps.scale, rtol=1e-6)
    np.testing.assert_allclose(ras.translate, lps.translate, rtol=1e-6, atol=1e-5)
    assert np.allclose(viewer.layers.extent.world, lps.extent.world)       # one place in the 3-D view


def test_segment_on_a_scan_keeps_its_grid_segments_the_acquired_planes_and_saves_onto_it(make_napari_viewer, qtbot,
                                                                                          tmp_path):
    from napari_medrwkv.plugin.segment_widget import SegmentWidget
    viewer = make_napari_viewer()
    path, planes = nuclei_scan(tmp_path)                  # acquired sagittally: slices along the last axis
    image = open_scan(viewer, path)
    assert image.metadata[METADATA_KEY]["slice_axis"] == 2
    widget = SegmentWidget(viewer)
    viewer.window.add_dock_widget(widget)
    widget.image_combo.setCurrentText(image.name)
    widget.model_combo.setCurrentText("rwkv_unet_t-dsb2018")
    widget.device_combo.setCurrentText("cpu")
    widget.scope_combo.setCurrentText("all slices")
    widget.probability_check.setChecked(True)
    widget.run()
    qtbot.waitUntil(lambda: widget.worker is None, timeout=120000)
    labels = viewer.layers[f"{image.name} [rwkv_unet_t-dsb2018]"]
    np.testing.assert_allclose(labels.scale, image.scale)
    np.testing.assert_allclose(labels.translate, image.translate)
    prob = viewer.layers[f"{image.name} [rwkv_unet_t-dsb2018] probability"]
    np.testing.assert_allclose(prob.scale, image.scale)
    assert prob.data.shape == labels.data.shape == image.data.shape
    expected = segment_scan(read_scan(path), model="rwkv_unet_t-dsb2018", device="cpu")
    assert np.array_equal(labels.data, expected) and labels.data.any()
    assert labels.metadata[METADATA_KEY] == image.metadata[METADATA_KEY]
    # Saved as NIfTI: the scan's own voxel order and affine, read back by nibabel.
    out = tmp_path / "cells_labels.nii.gz"
    labels.save(str(out), plugin="napari-medrwkv")
    back = nib.load(str(out))
    stored = read_scan(path).geometry.to_stored(labels.data)
    assert stored.shape == planes.shape
    np.testing.assert_array_equal(np.asarray(back.dataobj).transpose(2, 1, 0), stored)
    source = nib.load(str(path))
    np.testing.assert_allclose(back.affine, source.affine, rtol=1e-6, atol=1e-5)
    with pytest.raises(Exception, match="already exists"):
        labels.save(str(out), plugin="napari-medrwkv")


def test_labels_painted_on_a_new_layer_save_onto_the_grid_its_scale_and_translate_give(make_napari_viewer, tmp_path):
    viewer = make_napari_viewer()
    sitk.WriteImage(lps_image(volume()), str(tmp_path / "a.mha"))
    image = open_scan(viewer, tmp_path / "a.mha")
    painted = viewer.add_labels(np.zeros(image.data.shape, np.uint8), scale=image.scale, translate=image.translate)
    painted.data[2, 3:6, 4:9] = 5
    out = tmp_path / "painted.nrrd"
    painted.save(str(out), plugin="napari-medrwkv")
    back, source = read_scan(out), read_scan(tmp_path / "a.mha")
    assert np.array_equal(back.array, painted.data)
    np.testing.assert_allclose(back.geometry.spacing, source.geometry.spacing)
    np.testing.assert_allclose(back.geometry.origin, source.geometry.origin)
    image_itk = sitk.ReadImage(str(tmp_path / "a.mha"))
    labels_itk = sitk.ReadImage(str(out))
    # The painted voxel lands on the same physical point as the scan's voxel under it.
    assert np.allclose(labels_itk.TransformIndexToPhysicalPoint((4, 3, 2)), image_itk.TransformIndexToPhysicalPoint((4, 3, 2)))
    np.testing.assert_allclose(itk_affine(labels_itk.GetSpacing(), labels_itk.GetOrigin(), labels_itk.GetDirection()),
                               itk_affine(image_itk.GetSpacing(), image_itk.GetOrigin(), image_itk.GetDirection()))


def test_a_ct_window_chosen_in_segment_reaches_the_model(make_napari_viewer, qtbot, tmp_path):
    from napari_medrwkv.plugin.segment_widget import PERCENTILES, SegmentWidget
    viewer = make_napari_viewer()
    path, planes = nuclei_scan(tmp_path)
    ct = planes.astype(np.int16) * 8 - 900
    sitk.WriteImage(lps_image(ct, spacing=(0.5, 0.5, 4.0), direction=(0, 0, 1, 1, 0, 0, 0, 1, 0)), str(path))
    image = open_scan(viewer, path)
    widget = SegmentWidget(viewer)
    viewer.window.add_dock_widget(widget)
    widget.image_combo.setCurrentText(image.name)
    widget.model_combo.setCurrentText("rwkv_unet_t-dsb2018")        # a model change resets to the model's own
    assert widget.window_combo.currentText() == PERCENTILES and "window" not in widget.inference_choices()
    widget.window_combo.setCurrentIndex(widget.window_combo.findData("lung"))
    assert widget.inference_choices()["window"] == "lung"
    widget.device_combo.setCurrentText("cpu")
    widget.scope_combo.setCurrentText("all slices")
    widget.run()
    qtbot.waitUntil(lambda: widget.worker is None, timeout=120000)
    labels = viewer.layers[f"{image.name} [rwkv_unet_t-dsb2018]"].data
    scan = read_scan(path)
    assert np.array_equal(labels, segment_scan(scan, model="rwkv_unet_t-dsb2018", device="cpu", window="lung"))
    assert not np.array_equal(labels, segment_scan(scan, model="rwkv_unet_t-dsb2018", device="cpu"))


def test_the_loop_on_a_scan_keeps_its_grid_from_segment_to_the_saved_mask(make_napari_viewer, qtbot, tmp_path,
                                                                          monkeypatch):
    """Segment a scan stored RAS, correct and review two slices, fine-tune, re-segment the rest,
    save: every layer on the scan's scale, and the mask file on the scan's own grid."""
    from conftest import SAMPLES, tiny_finetune, untrained_checkpoint
    from napari_medrwkv.engine.imageio import read_image, read_mask
    from napari_medrwkv.plugin import finetune_widget, review
    from napari_medrwkv.plugin.segment_widget import SegmentWidget
    grey = read_image(SAMPLES / "nuclei_fluorescence.png")
    grey = grey[..., 0] if grey.ndim == 3 else grey
    truth = read_mask(SAMPLES / "nuclei_fluorescence_mask.png", 1)
    stack = np.stack([grey, grey[:, ::-1], grey[::-1], grey[::-1, ::-1]])          # (z, y, x)
    affine = np.diag([0.5, 0.5, 4.0, 1.0])            # i toward the right, j anterior (RAS): both run reversed
    affine[:3, 3] = (60.0, 70.0, -20.0)
    path = tmp_path / "cells.nii.gz"
    nib.save(nib.Nifti1Image(np.ascontiguousarray(stack.transpose(2, 1, 0)), affine), str(path))
    viewer = make_napari_viewer()
    image = open_scan(viewer, path)
    np.testing.assert_allclose(image.scale, (4.0, 0.5, 0.5))
    assert np.array_equal(image.data, stack[:, ::-1, ::-1])
    base = untrained_checkpoint(tmp_path / "base.safetensors")
    segment = SegmentWidget(viewer)
    viewer.window.add_dock_widget(segment)
    segment.add_model_source(base)
    segment.image_combo.setCurrentText(image.name)
    segment.scope_combo.setCurrentText("all slices")
    segment.run()
    qtbot.waitUntil(lambda: segment.worker is None, timeout=180000)
    labels = viewer.layers[f"{image.name} [base]"]
    truths = {0: truth, 1: truth[:, ::-1]}
    for z, target in truths.items():                         # the corrections, as brush strokes would paint
        labels.data[z] = target.astype(labels.data.dtype)
        review.set_reviewed(labels, z)
    finetune = tiny_finetune(viewer, qtbot, base, tmp_path / "tuned.safetensors")
    monkeypatch.setattr(finetune_widget.QMessageBox, "question",
                        lambda *a, **k: finetune_widget.QMessageBox.StandardButton.Yes)
    finetune.resegment_button.click()
    qtbot.waitUntil(lambda: finetune.worker is None, timeout=180000)
    assert (tmp_path / "tuned.safetensors").exists()
    assert np.array_equal(labels.data[0], truth) and np.array_equal(labels.data[1], truth[:, ::-1])
    np.testing.assert_allclose(labels.scale, image.scale)
    np.testing.assert_allclose(labels.translate, image.translate)
    out = tmp_path / "cells_labels.nii.gz"
    labels.save(str(out), plugin="napari-medrwkv")
    back = nib.load(str(out))
    np.testing.assert_allclose(back.affine, affine, atol=1e-5)
    saved = np.asarray(back.dataobj).transpose(2, 1, 0)        # (z, y, x) as the file stores them
    # The file stores rows and columns reversed: the reviewed slice lands there flipped back.
    np.testing.assert_array_equal(saved[0][::-1, ::-1], truth)


def test_review_fine_tune_and_resegment_follow_a_sagittal_scans_acquired_planes(make_napari_viewer, qtbot, tmp_path,
                                                                                 monkeypatch):
    """A scan acquired sagittally (slices across its last axis): Mark reviewed marks the acquired
    plane on screen, fine-tuning learns from that plane, and Re-segment fills the other acquired
    planes, keeping the reviewed one."""
    from conftest import tiny_finetune, untrained_checkpoint
    from napari_medrwkv.engine.infer import segment
    from napari_medrwkv.plugin import finetune_widget, review
    from napari_medrwkv.plugin.correct_widget import CorrectWidget
    from napari_medrwkv.plugin.segment_widget import SegmentWidget
    path, _ = nuclei_scan(tmp_path)
    viewer = make_napari_viewer()
    image = open_scan(viewer, path)
    assert image.metadata[METADATA_KEY]["slice_axis"] == 2 and image.data.shape == (64, 80, 5)
    base = untrained_checkpoint(tmp_path / "base.safetensors")
    segment_widget = SegmentWidget(viewer)
    viewer.window.add_dock_widget(segment_widget)
    segment_widget.add_model_source(base)
    segment_widget.image_combo.setCurrentText(image.name)
    segment_widget.scope_combo.setCurrentText("all slices")
    segment_widget.run()
    qtbot.waitUntil(lambda: segment_widget.worker is None, timeout=180000)
    labels = viewer.layers[f"{image.name} [base]"]
    assert review.slice_count(labels) == 5 and review.edited_slices(labels) == []
    correct = CorrectWidget(viewer)
    viewer.window.add_dock_widget(correct)
    correct.labels_combo.setCurrentText(labels.name)
    viewer.dims.set_current_step(0, 30)                       # an axial plane on screen: not a reviewable slice
    correct.mark_reviewed(True)
    assert review.reviewed(labels) == [] and "sagittal" in correct.status.text()
    viewer.dims.order = (2, 0, 1)                             # napari's Roll dimensions: the acquired planes
    viewer.dims.set_current_step(2, 3)
    truth = (image.data[:, :, 3] > np.percentile(image.data[:, :, 3], 70)).astype(labels.data.dtype)
    labels.data[:, :, 3] = truth                             # the correction, as the brush paints it
    assert review.edited_slices(labels) == [3]
    correct.mark_reviewed(True)
    assert review.reviewed(labels) == [3]
    [pair] = review.reviewed_pairs(viewer.layers)
    assert pair.index == 3 and np.array_equal(pair.image, image.data[:, :, 3]) and np.array_equal(pair.mask, truth)
    finetune = tiny_finetune(viewer, qtbot, base, tmp_path / "tuned.safetensors", batch_size=1)
    assert finetune.result is not None, finetune.status.text()
    monkeypatch.setattr(finetune_widget.QMessageBox, "question",
                        lambda *a, **k: finetune_widget.QMessageBox.StandardButton.Yes)
    finetune.resegment_button.click()
    qtbot.waitUntil(lambda: finetune.worker is None, timeout=180000)
    assert np.array_equal(labels.data[:, :, 3], truth)       # the reviewed plane is kept
    others = [0, 1, 2, 4]
    expected = segment(np.moveaxis(image.data[:, :, others], 2, 0), model=finetune.result.model)
    np.testing.assert_array_equal(np.moveaxis(labels.data[:, :, others], 2, 0), expected)
    assert review.edited_slices(labels) == []                 # what the plugin wrote, plane by plane


def test_a_dicom_folder_with_two_series_opens_a_layer_per_series_named_by_its_description(make_napari_viewer,
                                                                                          tmp_path, monkeypatch):
    from test_scans import volume, write_dicom_series
    from napari_medrwkv.plugin import scan_io
    scout, t1 = volume((3, 8, 8), seed=3), volume((6, 8, 8), seed=4)
    write_dicom_series(tmp_path / "study", scout, "1.2.826.0.1.3680043.2.1125.11", description="scout", number="1")
    write_dicom_series(tmp_path / "study", t1, "1.2.826.0.1.3680043.2.1125.22", spacing=(0.5, 0.5, 3.0),
                       description="T1 axial", number="2")
    viewer = make_napari_viewer()
    with pytest.warns(UserWarning, match=r"2 DICOM series, opened as 2 layers: #2 T1 axial \(6 slices\); "
                                         r"#1 scout \(3 slices\)"):
        layers = viewer.open(str(tmp_path / "study"), plugin="napari-medrwkv")
    assert [layer.name for layer in layers] == ["study #2 T1 axial", "study #1 scout"]
    assert [layer.visible for layer in layers] == [True, False]           # the largest shown
    np.testing.assert_array_equal(layers[0].data, t1)
    np.testing.assert_array_equal(layers[1].data, scout)
    np.testing.assert_allclose(layers[0].scale, (3.0, 0.5, 0.5))       # each series on its own grid
    np.testing.assert_allclose(layers[1].scale, (2.5, 0.8, 0.8))
    # Too large to open together: the largest alone, and the notice says how to open another...
    monkeypatch.setattr(scan_io, "ALL_SERIES_BYTES", 100)
    with pytest.warns(UserWarning, match=r"too large to open together: opened the largest, #2 T1 axial.*#1 scout "
                                         r"\(3 slices\).*open one of its files"):
        [largest] = viewer.open(str(tmp_path / "study"), plugin="napari-medrwkv")
    np.testing.assert_array_equal(largest.data, t1)
    # ...which opens that file's series.
    [one] = viewer.open(str(tmp_path / "study" / "11_001.dcm"), plugin="napari-medrwkv")
    np.testing.assert_array_equal(one.data, scout)


def test_correct_edits_the_acquired_plane_on_screen_of_a_sagittal_scan(make_napari_viewer, tmp_path):
    from napari_medrwkv.plugin.correct_widget import DELETE, CorrectWidget
    path, _ = nuclei_scan(tmp_path)
    viewer = make_napari_viewer()
    image = open_scan(viewer, path)                           # (64, 80, 5): sagittal planes across axis 2
    data = np.zeros(image.data.shape, np.int32)
    data[10:30, 10:30, 3] = 1
    data[18:22, 18:22, 3] = 0                                 # a hole in object 1 of plane 3
    data[40:50, 50:60, 3] = 2
    data[10:30, 10:30, 1] = 1
    data[18:22, 18:22, 1] = 0                                 # the same hole in plane 1, left alone
    labels = viewer.add_labels(data.copy(), name="mask", scale=image.scale, translate=image.translate,
                               metadata={METADATA_KEY: image.metadata[METADATA_KEY]})
    correct = CorrectWidget(viewer)
    viewer.window.add_dock_widget(correct)
    correct.labels_combo.setCurrentText("mask")
    assert correct.fill_holes() == 0 and "sagittal" in correct.status.text()     # axial planes on screen
    viewer.dims.order = (2, 0, 1)
    viewer.dims.set_current_step(2, 3)
    assert correct.fill_holes() == 16
    assert (labels.data[18:22, 18:22, 3] == 1).all() and (labels.data[18:22, 18:22, 1] == 0).all()
    world = labels.data_to_world((45, 55, 3))
    assert correct.apply_at(DELETE, labels, world) == 100
    assert not (labels.data[..., 3] == 2).any()
    expected = data.copy()
    expected[18:22, 18:22, 3] = 1
    expected[40:50, 50:60, 3] = 0
    np.testing.assert_array_equal(labels.data, expected)


def test_segment_current_slice_of_a_sagittal_scan_is_the_acquired_plane_at_the_slider(make_napari_viewer, qtbot,
                                                                                       tmp_path):
    from napari_medrwkv.engine.infer import segment
    from napari_medrwkv.plugin import review
    from napari_medrwkv.plugin.segment_widget import SegmentWidget
    path, _ = nuclei_scan(tmp_path)
    viewer = make_napari_viewer()
    image = open_scan(viewer, path)
    widget = SegmentWidget(viewer)
    viewer.window.add_dock_widget(widget)
    widget.image_combo.setCurrentText(image.name)
    widget.model_combo.setCurrentText("rwkv_unet_t-dsb2018")
    widget.device_combo.setCurrentText("cpu")
    widget.scope_combo.setCurrentText("current slice")
    viewer.dims.order = (2, 0, 1)                             # the acquired (sagittal) planes on screen
    viewer.dims.set_current_step(2, 1)
    widget.run()
    qtbot.waitUntil(lambda: widget.worker is None, timeout=120000)
    labels = viewer.layers[f"{image.name} [rwkv_unet_t-dsb2018]"]
    expected = segment(image.data[:, :, 1], model="rwkv_unet_t-dsb2018", device="cpu")
    assert 0.05 < expected.mean() < 0.6                       # nuclei found, not everything
    np.testing.assert_array_equal(labels.data[:, :, 1], expected)
    assert not np.delete(labels.data, 1, axis=2).any()        # the other planes untouched
    assert review.slice_axis(labels) == 2 and review.edited_slices(labels) == []
