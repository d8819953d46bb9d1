"""Instances: object metrics, training targets, post-processing, instance models end to end."""
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_medrwkv.engine.checkpoint import ModelInfo, read_info, save_checkpoint
from napari_medrwkv.engine.evaluate import evaluate
from napari_medrwkv.engine.imageio import read_image
from napari_medrwkv.engine.infer import segment, tile_starts
from napari_medrwkv.engine.instances import (connected_objects, decode_distance, encode_targets, instance_mask,
                                             instances_from_distance, instances_from_probabilities, object_distance,
                                             plane_instances, read_instances, touching_border)
from napari_medrwkv.engine.metrics import DSB_THRESHOLDS, instance_scores, object_matches
from napari_medrwkv.engine.model import load_model, with_instances

SAMPLES = Path(__file__).resolve().parents[1] / "napari_medrwkv" / "plugin" / "samples"


# --------------------------------------------------------------------------- metrics

def brute_scores(pred, target):
    """Every object against every object with boolean masks; a pair matches at t when IoU > t,
    and a true object counts once (its best match)."""
    pred_ids = [i for i in np.unique(pred) if i]
    true_ids = [i for i in np.unique(target) if i]
    best = {}
    for t_id in true_ids:
        t_mask = target == t_id
        for p_id in pred_ids:
            p_mask = pred == p_id
            value = (t_mask & p_mask).sum() / (t_mask | p_mask).sum()
            if value > best.get(t_id, (0, None))[0]:
                best[t_id] = (value, p_id)
    accuracies, pq = [], None
    for t in DSB_THRESHOLDS:
        matched = [(v, p) for v, p in best.values() if v > t]
        assert len({p for _, p in matched}) == len(matched)         # unique from 0.5 up
        tp = len(matched)
        fp, fn = len(pred_ids) - tp, len(true_ids) - tp
        accuracies.append(tp / (tp + fp + fn) if tp + fp + fn else 1.0)
        if t == 0.5:
            denominator = tp + fp / 2 + fn / 2
            pq = sum(v for v, _ in matched) / denominator if denominator else 1.0
    return {"accuracy50": accuracies[0], "accuracy75": accuracies[5], "dsb": float(np.mean(accuracies)), "pq": pq}


def blobs(rng, shape=(40, 48), count=8):
    """Random overlapping-free rectangles, ids shuffled."""
    labels = np.zeros(shape, np.int32)
    for i in range(1, count + 1):
        y, x = rng.integers(0, shape[0] - 4), rng.integers(0, shape[1] - 4)
        h, w = rng.integers(2, 12), rng.integers(2, 12)
        labels[y:y + h, x:x + w] = i
    return labels


def test_object_scores_of_hand_made_cases():
    truth = np.zeros((10, 20), np.uint16)
    truth[:, :6] = 1                   # 60 px
    truth[:, 6:10] = 2                 # 40 px, touching 1
    same = instance_scores(truth * 7, truth)         # ids need not agree
    assert same["accuracy50"] == same["accuracy75"] == same["dsb"] == same["pq"] == 1.0
    merged = instance_scores((truth > 0).astype(np.uint8), truth)
    # The merged blob has IoU 0.6 with object 1, 0.4 with object 2: TP 1, FN 1 at 0.5 and 0.55, nothing above.
    assert merged["accuracy50"] == pytest.approx(0.5) and merged["accuracy75"] == 0.0
    assert merged["dsb"] == pytest.approx(2 * 0.5 / 10)
    assert merged["pq"] == pytest.approx(0.6 / (1 + 0.5))
    half = np.zeros_like(truth)
    half[:, :3] = 1                    # IoU exactly 0.5 with object 1: not a match (IoU must exceed t)
    scores = instance_scores(half, truth)
    assert scores["accuracy50"] == 0.0 and (scores["tp50"], scores["fp50"], scores["fn50"]) == (0, 1, 2)
    empty = np.zeros_like(truth)
    assert instance_scores(empty, empty)["dsb"] == 1.0 and instance_scores(empty, truth)["dsb"] == 0.0
    with pytest.raises(ValueError):
        object_matches(truth, truth, [0.3])


@pytest.mark.parametrize("seed", range(6))
def test_object_scores_match_brute_force(seed):
    rng = np.random.default_rng(seed)
    truth = blobs(rng)
    pred = blobs(rng) if seed % 2 else np.roll(truth, (rng.integers(-2, 3), rng.integers(-2, 3)), (0, 1))
    fast, slow = instance_scores(pred, truth), brute_scores(pred, truth)
    for key in slow:
        assert fast[key] == pytest.approx(slow[key]), key


def test_evaluate_scores_objects_of_a_binary_model_as_its_connected_components():
    image = read_image(SAMPLES / "nuclei_fluorescence.png")
    truth = read_instances(SAMPLES / "nuclei_fluorescence_mask.png")
    model = load_model("rwkv_unet_t-dsb2018", device="cpu")
    scores = evaluate(model, [(image, truth)], instances=True)
    expected = instance_scores(connected_objects(segment(image, model=model)), truth)
    assert scores["dsb"] == pytest.approx(expected["dsb"])
    assert scores["accuracy50_pooled"] == pytest.approx(expected["tp50"] / (expected["tp50"] + expected["fp50"]
                                                                             + expected["fn50"]))
    assert 0.85 < scores["dice"] < 1 and "dsb" not in evaluate(model, [(image, truth > 0)])


def test_a_binary_mask_is_read_as_its_connected_components():
    mask = np.zeros((8, 8), np.uint8)
    mask[1:3, 1:3] = 255
    mask[5:7, 5:7] = 255
    assert instance_mask(mask, "m").max() == 2
    with pytest.raises(ValueError, match="negative"):
        instance_mask(-mask.astype(np.int16), "m")


# --------------------------------------------------------------------------- targets, post-processing

def discs(shape=(64, 96), centres=((32, 34), (32, 60)), radius=14):
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    labels = np.zeros(shape, np.uint16)
    for i, (cy, cx) in enumerate(centres, 1):
        labels[((yy - cy) ** 2 + (xx - cx) ** 2 <= radius ** 2) & (labels == 0)] = i
    return labels


def brute_border(labels, width):
    out = np.zeros(labels.shape, bool)
    for y in range(labels.shape[0]):
        for x in range(labels.shape[1]):
            window = labels[max(y - width, 0):y + width + 1, max(x - width, 0):x + width + 1]
            out[y, x] = len(set(np.unique(window)) - {0}) >= 2
    return out


@pytest.mark.parametrize("width", [1, 2])
def test_touching_border_matches_brute_force(width):
    labels = blobs(np.random.default_rng(width), (24, 30), 10)
    np.testing.assert_array_equal(touching_border(labels, width), brute_border(labels, width))


def test_two_touching_discs_become_two_labels():
    truth = discs()
    assert connected_objects(truth).max() == 1                       # a foreground mask merges them
    code = encode_targets(truth)
    foreground, border = (code & 1).astype(np.float32), ((code & 2) > 0).astype(np.float32)
    assert border.any() and not border[truth == 0].all()
    # Smooth probabilities, as a network gives them.
    from scipy import ndimage
    labels = instances_from_probabilities(ndimage.gaussian_filter(foreground, 1),
                                          ndimage.gaussian_filter(border, 1))
    assert labels.dtype == np.uint16 and labels.max() == 2
    assert instance_scores(labels, truth)["accuracy75"] == 1.0


def brute_distance(labels):
    """Per object pixel: the distance to the nearest pixel of the background, of another object or
    (as outside) an object pixel with a 4-neighbour in another object, over the object's largest."""
    h, w = labels.shape
    meeting = np.zeros(labels.shape, bool)
    for y in range(h):
        for x in range(w):
            for yy, xx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if labels[y, x] and 0 <= yy < h and 0 <= xx < w and labels[yy, xx] not in (0, labels[y, x]):
                    meeting[y, x] = True
    outside = np.argwhere((labels == 0) | meeting)
    out = np.zeros(labels.shape)
    for y, x in np.argwhere(labels > 0):
        out[y, x] = 0.5 if meeting[y, x] else np.sqrt(((outside - (y, x)) ** 2).sum(1)).min() if len(outside) else 0
    for i in np.unique(labels)[1:]:
        out[labels == i] /= out[labels == i].max()
    return out


def test_object_distance_matches_brute_force_and_splits_touching_discs():
    labels = np.pad(discs((30, 44), ((15, 13), (15, 29)), radius=8), 1)
    np.testing.assert_allclose(object_distance(labels), brute_distance(labels), atol=1e-6)
    code = encode_targets(labels)
    np.testing.assert_allclose(decode_distance(code), object_distance(labels), atol=0.5 / 63 + 1e-6)
    assert instances_from_distance((labels > 0).astype(np.float32), decode_distance(code)).max() == 2
    speck = np.zeros((20, 20), np.float32)
    speck[2:5, 2:5] = 0.9                      # foreground with no centre above the seed threshold: dropped
    assert instances_from_distance(speck, speck * 0.5).max() == 0


def test_objects_without_a_seed_keep_a_label_and_many_objects_take_uint32():
    foreground = np.zeros((20, 20), np.float32)
    foreground[2:4, 2:4] = 0.9                 # 4 px: smaller than a seed, still an object
    labels = instances_from_probabilities(foreground, np.zeros_like(foreground))
    assert labels.max() == 1 and (labels > 0).sum() == 4
    grid = np.zeros((3 * 300, 3 * 300), np.float32)
    grid[::3, ::3] = 1                         # 90000 one-pixel objects
    assert plane_instances(np.stack([grid, np.zeros_like(grid)])).dtype == np.uint32


# --------------------------------------------------------------------------- instance models

@pytest.fixture(scope="module")
def instance_model():
    """The shipped nuclei model made an instance model: the border channel starts at 'no border', so it
    labels the connected components of its foreground, which is what the seam test needs."""
    return with_instances(load_model("rwkv_unet_t-dsb2018", device="cpu"))


def test_an_instance_checkpoint_round_trips(tmp_path, instance_model):
    path = save_checkpoint(instance_model.net, tmp_path / "m.safetensors", instance_model.info)
    assert read_info(path).instances == "border" and read_info(path).out_channels == 2
    loaded = load_model(str(path), device="cpu")
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded.net(x), instance_model.net(x), atol=2e-2, rtol=0)
    image = read_image(SAMPLES / "nuclei_fluorescence.png")
    np.testing.assert_array_equal(segment(image, model=loaded) > 0, segment(image, model=instance_model) > 0)
    with pytest.raises(ValueError, match="binary"):
        ModelInfo(architecture="rwkv_unet_t", in_chans=3, num_classes=3, instances="border")


def test_a_distance_model_starts_from_its_foreground_and_round_trips(tmp_path):
    plain = load_model("rwkv_unet_t-dsb2018", device="cpu")
    model = with_instances(plain, "distance")
    path = save_checkpoint(model.net, tmp_path / "d.safetensors", model.info)
    loaded = load_model(str(path), device="cpu")
    assert loaded.info.instances == "distance" and loaded.info.out_channels == 2
    image = read_image(SAMPLES / "nuclei_fluorescence.png")
    labels = segment(image, model=loaded)
    # The distance output starts as a copy of the foreground's: seeds are the objects' surer parts,
    # grown back over the foreground; an object without one is dropped.
    found, foreground = labels > 0, segment(image, model=plain) > 0
    assert not (found & ~foreground).any() and found.sum() > 0.97 * foreground.sum()
    assert labels.dtype == np.uint16 and labels.max() > 50


def test_an_old_foreground_checkpoint_segments_as_before():
    model = load_model("rwkv_unet_t-dsb2018", device="cpu")
    assert model.info.instances == "" and model.info.out_channels == 1
    image = read_image(SAMPLES / "nuclei_fluorescence.png")
    labels, probs = segment(image, model=model, return_probabilities=True)
    assert labels.dtype == np.uint8 and set(np.unique(labels)) == {0, 1}
    np.testing.assert_array_equal(labels, probs > 0.5)
    from napari_medrwkv.engine.preprocess import image_to_channels
    with torch.no_grad():               # the plain network, no tiling: the probabilities as they always were
        direct = torch.sigmoid(model.net(torch.from_numpy(image_to_channels(image, 3))[None]))[0, 0].numpy()
    assert np.abs(direct - probs).max() < 1e-3


def test_instance_model_labels_touching_nuclei_apart_and_stacks_per_plane(instance_model):
    image = read_image(SAMPLES / "nuclei_fluorescence.png")
    labels = segment(image, model=instance_model)
    assert labels.dtype == np.uint16 and labels.max() > 50
    assert len(np.unique(labels)) == labels.max() + 1              # 1..N, no id left out
    stack = segment(np.stack([image, image]), model=instance_model)
    assert stack.shape == (2,) + labels.shape
    np.testing.assert_array_equal(stack[0], labels)
    np.testing.assert_array_equal(stack[1], labels)      # each plane numbered on its own, 1..N


def per_pixel_instance_model(image):
    """An instance model whose network sees one pixel at a time (a 1x1 convolution): red is object,
    green is border.  Its probabilities do not depend on the tiling, so whatever the labels of a
    tiled image lose or gain at the seams is the tiling's fault alone."""
    from napari_medrwkv.engine.model import SegmentationModel
    from napari_medrwkv.engine.preprocess import NORMALIZATION, image_to_channels
    x = image_to_channels(image, 3)
    net = torch.nn.Conv2d(3, 2, 1)
    with torch.no_grad():
        net.weight.zero_()
        for c in (0, 1):
            low, high = float(x[c].min()), float(x[c].max())
            net.weight[c, c] = 20 / (high - low)
            net.bias[c] = -10 * (high + low) / (high - low)
    info = ModelInfo(architecture="rwkv_unet_t", in_chans=3, num_classes=1, instances="border",
                     normalization=dict(NORMALIZATION), tile_size=128)
    return SegmentationModel(net.eval(), info, "per-pixel", torch.device("cpu"))


def test_tile_seams_neither_cut_nor_merge_objects():
    seams = sorted({s + d for s in tile_starts(416, 128, 32)[1:] for d in (0, 32)})    # tile edges
    centres = [(c, x) for c in seams[::2] for x in (seams[1] - 13, seams[1] + 13, seams[-2] - 13, seams[-2] + 13)]
    truth = discs((416, 416), centres, radius=12)                # pairs of touching discs astride the seams
    border = touching_border(truth)
    image = np.stack([(truth > 0) * 255, border * 255, np.zeros_like(truth)], -1).astype(np.uint8)
    model = per_pixel_instance_model(image)
    whole = segment(image, model=model, tile=512)
    tiled = segment(image, model=model, tile=128)
    assert whole.max() == len(centres) and instance_scores(whole, truth)["accuracy50"] == 1.0
    np.testing.assert_array_equal(tiled, whole)


def test_fine_tuning_from_corrected_instance_labels_keeps_an_instance_model(tmp_path, instance_model):
    """What the Fine-tune widget hands train(): in-memory (image, instance labels) pairs from the
    corrected layers.  An instance model stays one (ranked by the DSB score on the held-out pair);
    a binary model given instances="border" becomes one."""
    from napari_medrwkv.engine.train import TrainConfig, train
    image = read_image(SAMPLES / "nuclei_fluorescence.png")
    truth = read_instances(SAMPLES / "nuclei_fluorescence_mask.png")
    held = (read_image(SAMPLES / "nuclei_brightfield.png"), read_instances(SAMPLES / "nuclei_brightfield_mask.png"))
    cfg = TrainConfig(patch_size=64, batch_size=2, samples_per_epoch=2, num_workers=0)
    result = train(instance_model, [(image, truth)], out=tmp_path / "tuned.safetensors", epochs=1, device="cpu",
                   val_data=[held], config=cfg)
    assert result.model.info.instances == "border" and read_info(result.path).instances == "border"
    expected = instance_scores(segment(held[0], model=instance_model), held[1])["dsb"]
    assert result.start_val_dice == pytest.approx(expected)            # the score that ranks epochs
    assert segment(image, model=result.model).max() > 50
    plain = load_model("rwkv_unet_t-dsb2018", device="cpu")
    made = train(plain, [(image, truth)], epochs=1, device="cpu", config=TrainConfig(
        patch_size=64, batch_size=2, samples_per_epoch=2, num_workers=0, instances="border"))
    assert made.model.info.instances == "border" and plain.info.instances == ""


def test_medrwkv_segment_writes_instance_labels(tmp_path, instance_model):
    from napari_medrwkv.cli import main
    from napari_medrwkv.engine.imageio import _read_array
    path = save_checkpoint(instance_model.net, tmp_path / "nuclei-instances.safetensors", instance_model.info)
    assert main(["segment", str(SAMPLES / "nuclei_fluorescence.png"), "--model", str(path), "--out",
                 str(tmp_path / "out"), "--device", "cpu"]) == 0
    written = _read_array(tmp_path / "out" / "nuclei_fluorescence_labels.png", "labels")
    assert written.max() > 50                  # one id per nucleus (uint8 in the PNG while there are <= 255)
    expected = segment(read_image(SAMPLES / "nuclei_fluorescence.png"), model=load_model(str(path), device="cpu"))
    np.testing.assert_array_equal(written, expected)
