"""A model's own CT window: training with a window records it in the checkpoint, and segmenting
with that model uses it unless another is asked for; older checkpoints keep the percentiles."""
import numpy as np
import pytest

from conftest import tiny_finetune, untrained_checkpoint

from napari_medrwkv.engine.checkpoint import ModelInfo, read_info
from napari_medrwkv.engine.infer import segment
from napari_medrwkv.engine.model import load_model, read_model_info
from napari_medrwkv.engine.train import TrainConfig, train


def ct_slice(seed: int, size: int = 96):
    """A CT-like slice in HU: air around a soft-tissue body (40 HU) with a brighter lesion (90 HU)
    and a bone rim (1000 HU); the lesion is the mask."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    r = np.hypot(yy - size / 2, xx - size / 2)
    image = np.full((size, size), -1000.0)
    image[r < 0.42 * size] = 1000.0
    image[r < 0.38 * size] = 40.0
    cy, cx = rng.integers(int(0.35 * size), int(0.65 * size), 2)
    lesion = np.hypot(yy - cy, xx - cx) < 0.1 * size
    image[lesion] = 90.0
    image += rng.normal(0, 8, image.shape)
    return image.astype(np.int16), lesion.astype(np.uint8)


def tiny_config(**overrides):
    return TrainConfig.few_shot(patch_size=64, batch_size=2, samples_per_epoch=4, num_workers=0, **overrides)


@pytest.fixture(scope="module")
def windowed(tmp_path_factory):
    """A model trained a few steps on CT slices through the soft-tissue window."""
    folder = tmp_path_factory.mktemp("windowed")
    base = untrained_checkpoint(folder / "base.safetensors")
    pairs = [ct_slice(seed) for seed in range(3)]
    out = folder / "soft.safetensors"
    train(base, pairs, out=out, epochs=1, device="cpu", val_data=[ct_slice(9)], config=tiny_config(window="soft tissue"))
    return out


def test_a_model_trained_with_a_window_records_it_and_segments_with_it_by_default(windowed):
    info = read_model_info(str(windowed))
    assert info.window == "soft tissue" and info.normalization["mode"] == "window"
    model = load_model(str(windowed), device="cpu")
    image, _ = ct_slice(5)
    own = segment(image, model=model, return_probabilities=True)
    chosen = segment(image, model=model, window="soft tissue", return_probabilities=True)
    np.testing.assert_array_equal(own[0], chosen[0])
    np.testing.assert_array_equal(own[1], chosen[1])
    # An explicit choice still overrides the model's own: the percentiles, or another window.
    percentiles = segment(image, model=model, window="percentiles", return_probabilities=True)[1]
    lung = segment(image, model=model, window="lung", return_probabilities=True)[1]
    assert not np.allclose(percentiles, own[1], atol=1e-4) and not np.allclose(lung, own[1], atol=1e-4)
    # By path (as the CLI and the widgets pass it) too, and the planes of a stack alike.
    stack = np.stack([image, ct_slice(6)[0]])
    np.testing.assert_array_equal(segment(stack, model=str(windowed), device="cpu"),
                                  segment(stack, model=model, window="soft tissue"))


def test_checkpoints_without_a_window_keep_the_percentiles(tmp_path):
    base = untrained_checkpoint(tmp_path / "base.safetensors")
    assert read_info(base).window is None and read_model_info("rwkv_unet_t-dsb2018").window is None
    old = ModelInfo.from_dict({"architecture": "ds_vrwkv_t", "in_chans": 3, "num_classes": 1,
                               "normalization": {"mode": "percentile", "low": 0.5, "high": 99.5}})
    assert old.window is None
    image, _ = ct_slice(1)
    model = load_model(base, device="cpu")
    np.testing.assert_array_equal(segment(image, model=model, return_probabilities=True)[1],
                                  segment(image, model=model, window="percentiles", return_probabilities=True)[1])


def test_fine_tuning_a_windowed_model_keeps_its_window_unless_told(windowed, tmp_path):
    pairs = [ct_slice(seed) for seed in (3, 4)]
    kept = train(str(windowed), pairs, out=tmp_path / "kept.safetensors", epochs=1, device="cpu",
                 val_data=[ct_slice(8)], config=tiny_config())
    assert read_info(kept.path).window == "soft tissue"
    dropped = train(str(windowed), pairs, out=tmp_path / "dropped.safetensors", epochs=1, device="cpu",
                    val_data=[ct_slice(8)], config=tiny_config(window="percentiles"))
    assert read_info(dropped.path).window is None
    custom = train(str(windowed), pairs, out=tmp_path / "custom.safetensors", epochs=1, device="cpu",
                   val_data=[ct_slice(8)], config=tiny_config(window=(50, 350)))
    assert read_info(custom.path).window == [50.0, 350.0]
    with pytest.raises(ValueError, match="window"):
        train(str(windowed), pairs, epochs=1, device="cpu", config=tiny_config(window="liver"))


def test_a_windowed_model_on_a_lazy_image_says_what_to_do(windowed):
    da = pytest.importorskip("dask.array")
    image, _ = ct_slice(2)
    with pytest.raises(ValueError, match="soft tissue.*percentiles"):
        segment(da.from_array(image, chunks=48), model=str(windowed), device="cpu")


def test_train_cli_records_an_intensity_window(tmp_path):
    tifffile = pytest.importorskip("tifffile")
    from napari_medrwkv.cli import main
    for sub in ("images", "masks"):
        (tmp_path / "data" / sub).mkdir(parents=True)
    for seed in range(3):
        image, mask = ct_slice(seed)
        tifffile.imwrite(tmp_path / "data" / "images" / f"ct{seed}.tif", image)
        tifffile.imwrite(tmp_path / "data" / "masks" / f"ct{seed}.tif", mask)
    base = untrained_checkpoint(tmp_path / "base.safetensors")
    out = tmp_path / "lung.safetensors"
    assert main(["train", "--model", base, "--data", str(tmp_path / "data"), "--epochs", "1", "--patch-size", "64",
                 "--batch-size", "2", "--samples-per-epoch", "2", "--workers", "0", "--device", "cpu",
                 "--intensity-window=-600,1500", "--out", str(out)]) == 0
    assert read_info(out).window == [-600.0, 1500.0]
    assert main(["train", "--model", base, "--data", str(tmp_path / "data"), "--interactive", "--max-minutes", "1",
                 "--intensity-window", "lung", "--out", str(tmp_path / "x.safetensors")]) == 2


def test_segment_widget_records_its_window_and_fine_tune_learns_with_it(make_napari_viewer, qtbot, tmp_path, windowed):
    """Segment with a window chosen in the menu, review, fine-tune: the fine-tuned model records
    that window, and the menu then offers it as the model's own (and the percentiles beside it)."""
    pytest.importorskip("napari")
    from napari_medrwkv.plugin import review
    from napari_medrwkv.plugin.segment_widget import PERCENTILES, SegmentWidget
    viewer = make_napari_viewer()
    image = viewer.add_image(np.stack([ct_slice(seed)[0] for seed in range(3)]), name="ct")
    base = untrained_checkpoint(tmp_path / "base.safetensors")
    widget = SegmentWidget(viewer)
    viewer.window.add_dock_widget(widget)
    widget.add_model_source(base)
    assert widget.window_combo.itemText(0) == PERCENTILES and widget.window_combo.findData("percentiles") < 0
    widget.image_combo.setCurrentText(image.name)
    widget.device_combo.setCurrentText("cpu")
    widget.scope_combo.setCurrentText("all slices")
    widget.window_combo.setCurrentIndex(widget.window_combo.findData("lung"))
    widget.run()
    qtbot.waitUntil(lambda: widget.worker is None, timeout=120000)
    labels = viewer.layers["ct [base]"]
    assert labels.metadata[review.KEY]["window"] == "lung"
    for z in range(3):
        labels.data[z] = ct_slice(z)[1]
        review.set_reviewed(labels, z)
    tiny_finetune(viewer, qtbot, base, tmp_path / "tuned.safetensors")
    assert read_info(tmp_path / "tuned.safetensors").window == "lung"
    widget.add_model_source(str(windowed))
    assert widget.window_combo.itemText(0) == "the model's own: CT window soft tissue (40 / 400 HU)"
    assert widget.window_combo.itemData(0) is None and "window" not in widget.inference_choices()
    widget.window_combo.setCurrentIndex(widget.window_combo.findData("percentiles"))
    assert widget.inference_choices()["window"] == "percentiles"
