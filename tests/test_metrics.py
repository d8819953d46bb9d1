"""Dice, IoU, HD95 and per-class scores (napari_medrwkv.engine.metrics)."""
import math

import numpy as np
import pytest

from napari_medrwkv.engine.metrics import boundary, dice, hd95, iou, mean_dice, mean_finite, per_class_scores


def brute_boundary(mask):
    """Foreground pixels with a 4-neighbour outside the mask or outside the image."""
    h, w = mask.shape
    points = []
    for r in range(h):
        for c in range(w):
            if not mask[r, c]:
                continue
            neighbours = [(r - 1, c), (r + 1, c), (r, c - 1), (r, c + 1)]
            if any(not (0 <= rr < h and 0 <= cc < w) or not mask[rr, cc] for rr, cc in neighbours):
                points.append((r, c))
    return np.array(points, dtype=np.float64).reshape(-1, 2)


def brute_hd95(pred, target, spacing=(1.0, 1.0)):
    a = brute_boundary(pred > 0) * np.asarray(spacing)
    b = brute_boundary(target > 0) * np.asarray(spacing)
    d = np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))      # all pairwise distances
    return float(np.percentile(np.concatenate([d.min(1), d.min(0)]), 95))


def test_dice_iou_hand_computed():
    pred = np.array([[1, 1, 0], [0, 1, 0]])
    target = np.array([[1, 0, 0], [0, 1, 1]])
    # |A| = 3, |B| = 3, |A∩B| = 2, |A∪B| = 4
    assert dice(pred, target) == pytest.approx(4 / 6)
    assert iou(pred, target) == pytest.approx(2 / 4)
    pred = np.array([[255, 0, 0, 0]], np.uint8)       # non-zero = foreground
    target = np.array([[1, 1, 1, 1]], bool)
    assert dice(pred, target) == pytest.approx(2 * 1 / 5)
    assert iou(pred, target) == pytest.approx(1 / 4)
    assert dice(target, target) == iou(target, target) == 1.0


def test_dice_iou_empty_cases():
    empty, full = np.zeros((4, 5)), np.ones((4, 5))
    assert dice(empty, empty) == 1.0 and iou(empty, empty) == 1.0
    assert dice(empty, full) == 0.0 and iou(full, empty) == 0.0
    with pytest.raises(ValueError):
        dice(np.zeros((2, 2)), np.zeros((2, 3)))


def test_boundary_matches_brute_force():
    rng = np.random.default_rng(0)
    mask = rng.random((9, 13)) > 0.4
    points = np.argwhere(boundary(mask)).astype(np.float64)
    np.testing.assert_array_equal(points, brute_boundary(mask))


@pytest.mark.parametrize("shape", [(7, 11), (13, 5), (16, 16), (1, 9)])
def test_hd95_matches_brute_force_on_random_masks(shape):
    rng = np.random.default_rng(sum(shape))
    checked = 0
    for trial in range(12):
        density = rng.uniform(0.05, 0.7)
        pred, target = rng.random(shape) < density, rng.random(shape) < density
        if trial % 3 == 0:                             # a few single pixels too
            pred = np.zeros(shape, bool)
            pred[rng.integers(shape[0]), rng.integers(shape[1])] = True
        if not pred.any() or not target.any():
            continue
        assert hd95(pred, target) == pytest.approx(brute_hd95(pred, target), abs=1e-9)
        checked += 1
    assert checked >= 6


def test_hd95_odd_shapes_and_spacing():
    pred = np.zeros((15, 20), bool)
    target = np.zeros((15, 20), bool)
    pred[2:9, 3:7] = True                              # a rectangle
    pred[10, 15:19] = True                             # plus a thin line
    target[4:12, 5:14] = True
    target[6:8, 8:11] = False                          # a hole: inner boundary counts too
    assert hd95(pred, target) == pytest.approx(brute_hd95(pred, target))
    spacing = (2.0, 0.5)
    assert hd95(pred, target, spacing=spacing) == pytest.approx(brute_hd95(pred, target, spacing))


def test_hd95_single_pixels_and_identity():
    a, b = np.zeros((10, 10), bool), np.zeros((10, 10), bool)
    a[1, 1], b[4, 5] = True, True                      # 3-4-5 triangle
    assert hd95(a, b) == pytest.approx(5.0)
    assert hd95(a, a) == 0.0
    blob = np.zeros((10, 10), bool)
    blob[2:7, 3:8] = True
    assert hd95(blob, blob) == 0.0


def test_hd95_empty_cases():
    empty = np.zeros((6, 6), bool)
    some = empty.copy()
    some[2, 3] = True
    assert hd95(empty, empty) == 0.0
    assert math.isnan(hd95(empty, some)) and math.isnan(hd95(some, empty))


def test_mean_finite_counts_nan():
    assert mean_finite([1.0, float("nan"), 3.0]) == (2.0, 1)
    mean, bad = mean_finite([float("nan")])
    assert math.isnan(mean) and bad == 1


def test_per_class_scores_binary():
    pred = np.array([[0, 1, 1], [0, 0, 1]])
    target = np.array([[0, 1, 0], [0, 1, 1]]) * 255
    scores = per_class_scores(pred, target, 1)
    assert scores["dice"] == pytest.approx(dice(pred, target)) == pytest.approx(2 / 3)
    assert scores["iou"] == pytest.approx(0.5)
    assert scores["hd95"] == pytest.approx(hd95(pred, target))
    assert set(scores["per_class"]) == {1}


def test_per_class_scores_multiclass_means_present_classes():
    target = np.zeros((8, 8), int)
    pred = np.zeros((8, 8), int)
    target[1:4, 1:4] = 1
    pred[1:4, 1:3] = 1                                 # class 1: partly found
    target[5:7, 5:7] = 2                               # class 2: missed entirely
    pred[0, 7] = 3                                     # class 3: only predicted
    scores = per_class_scores(pred, target, num_classes=5)   # class 4 absent: not scored
    assert set(scores["per_class"]) == {1, 2, 3}
    d1 = dice(pred == 1, target == 1)
    assert d1 == pytest.approx(2 * 6 / 15)
    assert scores["dice"] == pytest.approx((d1 + 0 + 0) / 3)
    assert scores["iou"] == pytest.approx((6 / 9 + 0 + 0) / 3)
    assert math.isnan(scores["per_class"][2]["hd95"]) and math.isnan(scores["per_class"][3]["hd95"])
    assert scores["hd95"] == pytest.approx(hd95(pred == 1, target == 1))     # mean over finite values
    nothing = per_class_scores(np.zeros((3, 3), int), np.zeros((3, 3), int), 3)
    assert (nothing["dice"], nothing["iou"], nothing["hd95"]) == (1.0, 1.0, 0.0)
    with pytest.raises(ValueError):
        per_class_scores(np.full((2, 2), 3), np.zeros((2, 2), int), 3)


@pytest.mark.parametrize("num_classes", [1, 2, 4])
def test_mean_dice_is_the_dice_evaluate_reports(num_classes):
    # Training ranks its epochs with mean_dice and promises the ranking evaluate would give.
    rng = np.random.default_rng(num_classes)
    for shape in [(1, 1), (7, 5), (33, 18)]:
        for _ in range(10):
            pred = rng.integers(0, max(num_classes, 2), shape) * rng.integers(0, 2, shape)
            target = rng.integers(0, max(num_classes, 2), shape) * rng.integers(0, 2, shape)
            assert mean_dice(pred, target, num_classes) == per_class_scores(pred, target, num_classes)["dice"]
    empty = np.zeros((4, 6), int)
    assert mean_dice(empty, empty, num_classes) == 1.0
    with pytest.raises(ValueError, match="shape"):
        mean_dice(np.zeros((2, 3), int), np.zeros((3, 2), int), num_classes)
    with pytest.raises(ValueError, match="num_classes"):
        mean_dice(empty, empty, 0)


def test_mean_dice_refuses_labels_outside_the_classes():
    with pytest.raises(ValueError, match="outside the 3 classes"):
        mean_dice(np.full((2, 2), 3), np.zeros((2, 2), int), 3)
