"""Inference settings (threshold, largest object, test-time flips): the filter, the
checkpoint field, segment's defaults, and `calibrate`, which chooses them on validation data."""
import json
from collections import deque

import numpy as np
import pytest
import safetensors.torch
import torch

import napari_medrwkv as nm
from napari_medrwkv.cli import main
from napari_medrwkv.engine.calibrate import calibrate
from napari_medrwkv.engine.checkpoint import INFERENCE_DEFAULTS, ModelInfo, read_info, save_checkpoint, write_info
from napari_medrwkv.engine.datasets import find_pairs
from napari_medrwkv.engine.imageio import read_image
from napari_medrwkv.engine.postprocess import binary_labels, keep_largest_object
from napari_medrwkv.models import create_model
from scipy import ndimage

from conftest import SAMPLES

DSB = "rwkv_unet_t-dsb2018"
BUSI = "rwkv_unet_t-busi"


# ---------------------------------------------------------------------------- the filter

def _largest_by_flood_fill(mask):
    """Reference: breadth-first flood fill over the 8 neighbours, pixel by pixel."""
    seen = np.zeros(mask.shape, bool)
    best = []
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        seen[start] = True
        queue, pixels = deque([start]), []
        while queue:
            y, x = queue.popleft()
            pixels.append((y, x))
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    n = (y + dy, x + dx)
                    if 0 <= n[0] < mask.shape[0] and 0 <= n[1] < mask.shape[1] and mask[n] and not seen[n]:
                        seen[n] = True
                        queue.append(n)
        if len(pixels) > len(best):        # strictly larger: the first found (raster order) wins a tie
            best = pixels
    out = np.zeros_like(mask)
    for p in best:
        out[p] = 1
    return out


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("shape", [(1, 1), (7, 1), (19, 23), (40, 33)])
def test_largest_object_matches_a_flood_fill(seed, shape):
    rng = np.random.default_rng(seed)
    mask = (rng.random(shape) < rng.uniform(0.2, 0.6)).astype(np.uint8)
    np.testing.assert_array_equal(keep_largest_object(mask), _largest_by_flood_fill(mask))


def test_largest_object_edge_cases():
    empty = np.zeros((5, 6), np.uint8)
    assert not keep_largest_object(empty).any()
    diagonal = np.eye(4, dtype=np.uint8)              # touching at corners: one object
    np.testing.assert_array_equal(keep_largest_object(diagonal), diagonal)
    tie = np.zeros((3, 7), np.uint8)
    tie[1, 1:3] = tie[1, 4:6] = 1
    assert keep_largest_object(tie)[1].tolist() == [0, 1, 1, 0, 0, 0, 0]


def test_binary_labels_filter_each_plane_of_a_stack_on_its_own():
    probs = np.zeros((2, 8, 8), np.float32)
    probs[0, :2, :2], probs[0, 5:, 5:] = 0.9, 0.8          # plane 0: 4 px and 9 px
    probs[1, 0, :] = 0.7                                    # plane 1: one 8 px object
    labels = binary_labels(probs, 0.5, True)
    assert labels.dtype == np.uint8 and labels[0].sum() == 9 and labels[0, 5:, 5:].all()
    assert labels[1].sum() == 8
    assert binary_labels(probs, 0.75, False).sum() == 4 + 9   # above, not at or above, the threshold


# ---------------------------------------------------------------------------- the checkpoint field

def test_model_info_checks_its_inference_settings():
    info = ModelInfo("rwkv_unet_t", 3, 1)
    assert info.inference == INFERENCE_DEFAULTS
    assert ModelInfo("rwkv_unet_t", 3, 1, inference={"threshold": 0.4}).inference == \
        {"flips": False, "threshold": 0.4, "largest_component": False}
    for bad, words in [({"threshold": 1.0}, "threshold"), ({"threshold": "0.4"}, "threshold"),
                       ({"flips": 1}, "flips"), ({"largest": True}, r"unknown key\(s\) largest")]:
        with pytest.raises(ValueError, match=words):
            ModelInfo("rwkv_unet_t", 3, 1, inference=bad)
    with pytest.raises(ValueError, match="binary models only"):
        ModelInfo("rwkv_unet_t", 3, 3, inference={"largest_component": True})
    assert ModelInfo("rwkv_unet_t", 3, 3, inference={"flips": True}).inference["flips"]


def test_settings_survive_a_checkpoint_round_trip_and_old_files_get_the_defaults(tmp_path):
    net = create_model("ds_vrwkv_t")
    settings = {"flips": True, "threshold": 0.35, "largest_component": True}
    save_checkpoint(net, tmp_path / "a.safetensors", ModelInfo("ds_vrwkv_t", 3, 1, inference=settings))
    assert read_info(tmp_path / "a.safetensors").inference == settings
    assert nm.load_model(str(tmp_path / "a.safetensors"), device="cpu").info.inference == settings
    old = json.loads(ModelInfo("ds_vrwkv_t", 3, 1).to_json())
    del old["inference"]                                   # a file written before the field existed
    assert ModelInfo.from_dict(old).inference == INFERENCE_DEFAULTS


def test_write_info_copies_the_weights_byte_for_byte(tmp_path):
    save_checkpoint(create_model("ds_vrwkv_t"), tmp_path / "a.safetensors", ModelInfo("ds_vrwkv_t", 3, 1))
    info = read_info(tmp_path / "a.safetensors")
    info.inference["threshold"] = 0.6
    write_info(tmp_path / "a.safetensors", info, tmp_path / "b.safetensors")
    a, b = (safetensors.torch.load_file(str(tmp_path / n)) for n in ("a.safetensors", "b.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    assert read_info(tmp_path / "b.safetensors").inference["threshold"] == 0.6
    assert read_info(tmp_path / "a.safetensors").inference["threshold"] == 0.5


# ---------------------------------------------------------------------------- segment's defaults

@pytest.fixture(scope="module")
def nuclei():
    return nm.load_model(DSB, device="cpu"), read_image(SAMPLES / "nuclei_brightfield.png")


def test_segment_takes_the_models_settings_unless_told_otherwise(nuclei):
    model, image = nuclei
    plain, probs = nm.segment(image, model=model, return_probabilities=True)
    assert ndimage.label(plain, np.ones((3, 3)))[1] > 5                       # many nuclei
    np.testing.assert_array_equal(plain, probs > 0.5)
    calibrated = nm.SegmentationModel(model.net, ModelInfo(**{**model.info.to_dict(),
                                      "inference": {"threshold": 0.7, "largest_component": True}}),
                                      model.source, model.device)
    one = nm.segment(image, model=calibrated)
    np.testing.assert_array_equal(one, keep_largest_object((probs > 0.7).astype(np.uint8)))
    assert ndimage.label(one, np.ones((3, 3)))[1] == 1
    # the caller's explicit choice wins over the model's
    np.testing.assert_array_equal(nm.segment(image, model=calibrated, threshold=0.5, largest_component=False), plain)
    with pytest.raises(ValueError, match="threshold"):
        nm.segment(image, model=model, threshold=1.5)


def test_largest_object_works_slice_by_slice_on_a_stack(nuclei):
    model, image = nuclei
    stack = np.stack([image, image[::-1]])
    labels = nm.segment(stack, model=model, largest_component=True)
    assert [ndimage.label(plane, np.ones((3, 3)))[1] for plane in labels] == [1, 1]
    np.testing.assert_array_equal(labels[0], nm.segment(image, model=model, largest_component=True))


def test_multi_class_models_refuse_a_threshold():
    model = nm.load_model("ds_vrwkv_t", device="cpu", num_classes=3)
    with pytest.raises(ValueError, match="binary models only"):
        nm.segment(np.zeros((32, 32), np.uint8), model=model, largest_component=True)
    with pytest.raises(ValueError, match="binary"):
        calibrate(model, [(np.zeros((32, 32), np.uint8), np.zeros((32, 32), np.uint8))])


# ---------------------------------------------------------------------------- calibrate

def test_calibration_on_many_nuclei_keeps_every_object(nuclei, sample_arrays):
    model, _ = nuclei
    result = calibrate(model, sample_arrays, thresholds=[0.4, 0.6])
    assert result["n"] == 2 and not result["inference"]["largest_component"]
    grid = {(c["flips"], c["threshold"], c["largest_component"]): c["dice"] for c in result["grid"]}
    assert set(grid) == {(False, t, lc) for t in (0.4, 0.5, 0.6) for lc in (False, True)}   # 0.5 always tried
    assert grid[False, 0.5, True] < grid[False, 0.5, False] - 0.3                   # one nucleus of dozens
    assert result["dice"] >= max(grid.values()) - 0.001 and result["baseline_dice"] == grid[False, 0.5, False]
    # a gain within min_gain of the defaults is noise: the defaults stay
    assert calibrate(model, sample_arrays, thresholds=[0.4, 0.6], min_gain=1 - 1e-9)["inference"] == INFERENCE_DEFAULTS
    with pytest.raises(ValueError, match="between 0 and 1"):
        calibrate(model, sample_arrays, thresholds=[0.5, 1.2])


@pytest.fixture(scope="module")
def busi_val(tmp_path_factory):
    from conftest import SHARED_DATA
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA}")
    pairs = [p for p in find_pairs(SHARED_DATA / "busi", "val") if not p.stem.startswith("normal")][:6]
    folder = tmp_path_factory.mktemp("busi_val")
    for sub in ("images", "masks"):
        (folder / sub).mkdir()
    for p in pairs:
        (folder / "images" / p.image.name).symlink_to(p.image)
        (folder / "masks" / p.mask.name).symlink_to(p.mask)
    return folder


def test_calibrated_settings_reproduce_their_score_through_evaluate(busi_val):
    model = nm.load_model(BUSI, device="cpu")
    result = calibrate(model, busi_val, try_flips=True, thresholds=[0.4, 0.6])
    grid = result["grid"]
    top = max(c["dice"] for c in grid)
    assert len(grid) == 2 * 3 * 2 and top - 0.001 <= result["dice"] <= top
    plainest = next(c for c in grid if c["dice"] >= top - 0.001)
    assert result["inference"] == {k: plainest[k] for k in INFERENCE_DEFAULTS}
    strict = calibrate(model, busi_val, try_flips=True, thresholds=[0.4, 0.6], min_gain=0)
    assert strict["dice"] == top and strict["grid"] == grid
    scores = nm.evaluate(model, busi_val, **result["inference"])
    assert scores["dice"] == pytest.approx(result["dice"], abs=1e-9) and scores["inference"] == result["inference"]
    defaults = nm.evaluate(model, busi_val, flips=False, threshold=0.5, largest_component=False)
    assert defaults["dice"] == pytest.approx(result["baseline_dice"], abs=1e-9)


def test_calibrate_command_writes_the_choice_into_a_copy(busi_val, tmp_path, capsys):
    source = tmp_path / "busi.safetensors"
    write_info(_shipped(BUSI), read_info(_shipped(BUSI)), source)
    from napari_medrwkv.engine.checkpoint import record_metrics
    record_metrics(source, {"test_dice": 0.5, "test_split": "busi test (64 images)", "val_dice": 0.7})
    out = tmp_path / "calibrated.safetensors"
    args = ["calibrate", "--model", str(source), "--data", str(busi_val), "--thresholds", "0.4,0.6", "--out", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    info = read_info(out)
    assert "chose" in printed and "test_*" in printed                     # says it dropped stale scores
    assert "test_dice" not in info.metrics and info.metrics["val_dice"] == 0.7
    assert info.metrics["calibrated_on"] == f"{busi_val.name} all (6 images)"
    assert info.training["calibration"].startswith("medrwkv") and info.inference["threshold"] in (0.4, 0.5, 0.6)
    a, b = (safetensors.torch.load_file(str(p)) for p in (source, out))
    assert all(torch.equal(a[k], b[k]) for k in a)                         # weights as they were
    # evaluate now uses the chosen settings, and says so when it records
    assert main(["evaluate", "--model", str(out), "--data", str(busi_val), "--json", "--record"]) == 0
    scores = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert scores["dice"] == pytest.approx(info.metrics["calibrated_dice"], abs=1e-9)
    assert scores["inference"] == info.inference
    # an existing --out is never replaced without --overwrite; a bare architecture has no file to copy
    before = out.read_bytes()
    assert main(args) == 2 and "--overwrite" in capsys.readouterr().err and out.read_bytes() == before
    assert main(["calibrate", "--model", "rwkv_unet_t", "--data", str(busi_val), "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "rwkv_unet_t" in capsys.readouterr().err and not (tmp_path / "x.safetensors").exists()
    assert main(args[:-2] + ["--thresholds", "0.4,abc", "--out", str(tmp_path / "y.safetensors")]) == 2
    assert "--thresholds" in capsys.readouterr().err


def _shipped(name):
    from napari_medrwkv.engine.model import shipped_path
    return shipped_path(name)


def test_fine_tuning_keeps_the_settings_and_drops_the_calibration_scores(tmp_path, sample_arrays):
    settings = {"flips": False, "threshold": 0.4, "largest_component": True}
    info = ModelInfo("ds_vrwkv_t", 3, 1, inference=settings, metrics={"calibrated_dice": 0.9, "test_dice": 0.8})
    save_checkpoint(create_model("ds_vrwkv_t"), tmp_path / "a.safetensors", info)
    config = nm.TrainConfig(patch_size=48, batch_size=2, samples_per_epoch=2)
    result = nm.train(str(tmp_path / "a.safetensors"), sample_arrays, out=tmp_path / "b.safetensors", epochs=1,
                      device="cpu", val_data=sample_arrays, config=config)
    tuned = read_info(tmp_path / "b.safetensors")
    assert result.model.info.inference == tuned.inference == settings
    assert "calibrated_dice" not in tuned.metrics and "test_dice" not in tuned.metrics   # they were the old weights'
