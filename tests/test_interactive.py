"""Click to fix, headless: prompt maps, the window, the simulated user, refine and its training examples."""
import re

import numpy as np
import pytest
import torch

from conftest import SAMPLES, untrained_checkpoint
from napari_medrwkv.engine.checkpoint import read_info, save_checkpoint
from napari_medrwkv.engine.imageio import read_image
from napari_medrwkv.engine.infer import segment
from napari_medrwkv.engine.interactive import (DEFAULT_MODEL, PROMPT_CHANNELS, encode_prompts, iou, next_click,
                                               refine, square_window, widened_window)
from napari_medrwkv.engine.interactive_train import (LabelledImage, _clicked_batch, object_labels, promptable_start,
                                                     simulate_example)
from napari_medrwkv.engine.model import list_shipped, load_model


@pytest.fixture(scope="module")
def prompt_checkpoint(tmp_path_factory):
    """A prompt-aware checkpoint grown from an untrained automatic one (seeded)."""
    folder = tmp_path_factory.mktemp("interactive")
    start = untrained_checkpoint(folder / "auto.safetensors")
    model = promptable_start(start)
    return save_checkpoint(model.net, folder / "prompted.safetensors", model.info), start


# --------------------------------------------------------------------------- the simulated user
def test_clicker_clicks_the_centre_of_a_missed_object():
    truth = np.zeros((40, 50), bool)
    truth[10:21, 20:31] = True                             # an 11x11 square, centre (15, 25)
    assert next_click(np.zeros_like(truth), truth) == (15.0, 25.0, True)


def test_clicker_clicks_the_larger_error_and_negative_in_a_false_region():
    truth = np.zeros((60, 60), bool)
    truth[5:10, 5:10] = True                               # a small missed part ...
    prediction = truth.copy()
    prediction[5:10, 5:10] = False
    prediction[30:51, 30:51] = True                        # ... and a large false one
    row, col, positive = next_click(prediction, truth)
    assert not positive and (row, col) == (40.0, 40.0)


def test_clicker_counts_the_image_border_as_an_edge():
    # A missed band along the border: its farthest point is half its width in, not at the border.
    truth = np.zeros((30, 30), bool)
    truth[:, :9] = True
    row, col, positive = next_click(np.zeros_like(truth), truth)
    assert positive and col == 4.0


def test_clicker_is_done_when_the_prediction_is_right():
    truth = np.zeros((8, 8), bool)
    truth[2:5, 2:5] = True
    assert next_click(truth, truth) is None
    assert iou(truth, truth) == 1.0 and iou(truth, ~truth) == 0.0


# --------------------------------------------------------------------------- maps and windows
def test_prompt_maps_hold_disks_box_and_mask_in_their_channels():
    mask = np.zeros((32, 32), bool)
    mask[3:6, 3:6] = True
    maps = encode_prompts(32, [(10, 12, True), (20, 22, False)], (1, 2, 9, 30), mask, radius=2)
    assert maps.shape == (PROMPT_CHANNELS, 32, 32) and maps.dtype == np.float32
    assert maps[0, 10, 12] == 1 and maps[0].sum() == 13 and maps[0, 20, 22] == 0    # a radius-2 disk
    assert maps[1, 20, 22] == 1 and maps[1].sum() == 13
    assert maps[2].sum() == 8 * 28 and maps[2, 1, 2] == 1 and maps[2, 9, 2] == 0
    assert np.array_equal(maps[3] > 0, mask)
    edge = encode_prompts(16, [(0, 0, True)], None, None, radius=3)                 # cut at the border
    assert edge[0, 0, 0] == 1 and edge[0].sum() < 29


@pytest.mark.parametrize("shape, extent, expected_side", [
    ((500, 400), (100, 100, 150, 130), 70),                # 1.4 x 50
    ((500, 400), (100, 100, 101, 101), 64),                # one click: the smallest window
    ((50, 400), (10, 10, 40, 300), 50),                    # cut to the image
])
def test_square_window_contains_the_extent_and_stays_inside(shape, extent, expected_side):
    top, left, bottom, right = square_window(shape, extent)
    assert 0 <= top and 0 <= left and bottom <= shape[0] and right <= shape[1]
    assert top <= extent[0] and left <= extent[1] and bottom >= min(extent[2], shape[0])
    assert max(bottom - top, right - left) == expected_side or bottom - top == shape[0]


def test_a_widened_window_doubles_towards_the_object():
    window = (100, 100, 164, 164)
    inside = np.zeros((64, 64), bool)
    inside[20:40, 30:] = True                              # runs out of the window's right side
    top, left, bottom, right = widened_window((500, 400), window, inside)
    assert (bottom - top, right - left) == (128, 128)
    assert left > 100 - 32 and right > 164 + 32            # grown more to the right than to the left
    assert top <= 120 and bottom >= 140 and left <= 130   # the seen object stays inside
    # Near the image's corner the wider window is moved inside, and cut where the image is smaller.
    assert widened_window((150, 400), (0, 0, 64, 64), np.ones((64, 64), bool)) == (0, 0, 128, 128)
    assert widened_window((100, 400), (0, 0, 64, 64), np.ones((64, 64), bool)) == (0, 0, 100, 128)


# --------------------------------------------------------------------------- prompt-aware networks
def test_a_grown_network_computes_what_its_start_did(prompt_checkpoint):
    path, start = prompt_checkpoint
    auto, prompted = load_model(start), load_model(path)
    assert read_info(path).prompt_channels == PROMPT_CHANNELS and read_info(path).in_chans == 3
    x = torch.rand(2, 3, 48, 40)
    prompts = torch.rand(2, PROMPT_CHANNELS, 48, 40)        # whatever the prompts, until trained
    with torch.no_grad():
        torch.testing.assert_close(prompted.net(torch.cat([x, prompts], 1)), auto.net(x), rtol=0, atol=1e-3)
    image = read_image(SAMPLES / "nuclei_fluorescence.png")
    # With no prompt, the prompt-aware model segments as the automatic path does.
    assert np.array_equal(segment(image, model=prompted), segment(image, model=auto))


def test_refine_refuses_bad_prompts_by_name(prompt_checkpoint):
    path, start = prompt_checkpoint
    image = np.zeros((40, 60), np.uint8)
    cases = [
        (dict(points=[(45, 10, True)]), "points[0] = (45, 10) lies outside the 40x60 image"),
        (dict(points=[(5, 10)]), "points[0]"),
        (dict(box=(10, 10, 10, 30)), "box = (10, 10, 10, 30) covers no pixel"),
        (dict(mask=np.zeros((40, 61), bool)), "mask has shape (40, 61)"),
        (dict(points=[(5, 5, False)]), "nothing says where the object is"),
        (dict(), "nothing says where the object is"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=re.escape(message)):
            refine(image, model=path, **kwargs)
    with pytest.raises(ValueError, match="automatic model; it takes no clicks"):
        refine(image, points=[(5, 5, True)], model=start)
    with pytest.raises(ValueError, match="a stack"):
        refine(np.zeros((3, 40, 60), np.uint8), points=[(5, 5, True)], model=path)


def test_refine_returns_a_mask_of_the_image_shape_from_a_window(prompt_checkpoint):
    path, _ = prompt_checkpoint
    image = np.random.default_rng(0).integers(0, 255, (300, 410, 3), dtype=np.uint8)
    mask = refine(image, points=[(150, 200, True)], model=path)
    assert mask.shape == (300, 410) and mask.dtype == bool
    start = np.zeros((300, 410), bool)
    start[100:140, 100:160] = True
    assert refine(image, mask=start, model=path).shape == (300, 410)


# --------------------------------------------------------------------------- the shipped prompt-aware model
shipped = pytest.mark.skipif(DEFAULT_MODEL not in list_shipped(), reason=f"{DEFAULT_MODEL} is not shipped")


def _nucleus(labels, index):
    objects, count = object_labels(labels)
    sizes = np.bincount(objects.ravel())[1:]
    label = int(np.argsort(sizes)[::-1][index]) + 1          # large nuclei first: plain to click
    return objects == label


@shipped
def test_a_positive_click_in_a_missed_object_adds_it():
    image = read_image(SAMPLES / "nuclei_fluorescence.png")
    target = _nucleus(read_image(SAMPLES / "nuclei_fluorescence_mask.png"), 0)
    row, col, _ = next_click(np.zeros_like(target), target)
    mask = refine(image, points=[(row, col, True)])
    assert mask[int(row), int(col)] and iou(mask, target) > 0.6


@shipped
def test_a_negative_click_removes_a_false_region():
    image = read_image(SAMPLES / "nuclei_fluorescence.png")
    labels = read_image(SAMPLES / "nuclei_fluorescence_mask.png")
    target = _nucleus(labels, 0)
    wrong = target | _nucleus(labels, 1)                     # two nuclei where there should be one
    row, col, positive = next_click(wrong, target)
    assert not positive
    first = next_click(np.zeros_like(target), target)
    fixed = refine(image, points=[first, (row, col, False)], mask=wrong)
    assert not fixed[int(row), int(col)] and iou(fixed, target) > iou(wrong, target)


# --------------------------------------------------------------------------- training examples
def test_object_labels_of_binary_and_instance_masks():
    binary = np.zeros((20, 20), np.uint8)
    binary[1:6, 1:6] = 255
    binary[10:16, 10:16] = 255
    binary[18, 18] = 255                                     # a speck, not an object
    objects, count = object_labels(binary)
    assert count == 2 and set(np.unique(objects)) == {0, 1, 2}
    instances = np.zeros((20, 20), np.uint16)
    instances[1:6, 1:6], instances[5:9, 5:9] = 7, 300        # touching nuclei stay apart
    objects, count = object_labels(instances)
    assert count == 2 and objects[1, 1] != objects[8, 8]


def test_simulated_examples_give_the_refine_input_and_prompts_that_make_sense():
    rng = np.random.default_rng(0)
    image = read_image(SAMPLES / "nuclei_brightfield.png")
    objects, count = object_labels(read_image(SAMPLES / "nuclei_brightfield_mask.png"))
    item = LabelledImage(image, objects, count, "sample")
    for _ in range(30):
        example = simulate_example(item, rng, size=96)
        assert example.x.shape == (3, 96, 96) and example.target.shape == (96, 96)
        if not example.target.any():
            continue
        assert example.points or example.box is not None or example.mask is not None
        for row, col, positive in example.points:
            assert example.target[int(row), int(col)] == positive
        assert example.prompt_maps().shape == (PROMPT_CHANNELS, 96, 96)


def test_training_rounds_add_the_clickers_click_and_feed_the_prediction_back(prompt_checkpoint):
    path, _ = prompt_checkpoint
    net = load_model(path).net.eval()
    rng = np.random.default_rng(1)
    image = read_image(SAMPLES / "nuclei_fluorescence.png")
    objects, count = object_labels(read_image(SAMPLES / "nuclei_fluorescence_mask.png"))
    examples = [simulate_example(LabelledImage(image, objects, count, "s"), rng, size=64) for _ in range(3)]
    before = [len(e.points) for e in examples]
    x = _clicked_batch(net, examples, 2, torch.device("cpu"))
    assert x.shape == (3, 3 + PROMPT_CHANNELS, 64, 64)
    assert all(len(e.points) <= b + 2 for e, b in zip(examples, before))
    assert all(e.mask is not None and e.mask.shape == (64, 64) for e in examples)


# --------------------------------------------------------------------------- the command line
def test_medrwkv_train_interactive_writes_a_prompt_aware_checkpoint(sample_folder, tmp_path, prompt_checkpoint, capsys):
    from napari_medrwkv.cli import main
    _, start = prompt_checkpoint
    out = tmp_path / "clicks.safetensors"
    assert main(["train", "--interactive", "--model", start, "--data", str(sample_folder), "--max-minutes", "0.05",
                 "--batch-size", "2", "--window", "64", "--device", "cpu", "--out", str(out)]) == 0
    info = read_info(out)
    assert info.prompt_channels == PROMPT_CHANNELS and info.tile_size == 64
    assert info.class_names == ["background", "object"]
    assert info.training["interactive"] and info.training["command"].startswith("medrwkv train --interactive")
    assert str(out) in capsys.readouterr().out
    image = read_image(SAMPLES / "nuclei_fluorescence.png")
    assert refine(image, points=[(100, 100, True)], model=str(out)).shape == image.shape[:2]


def test_medrwkv_train_interactive_refuses_what_does_not_apply(sample_folder, tmp_path, prompt_checkpoint, capsys):
    from napari_medrwkv.cli import main
    _, start = prompt_checkpoint
    out = tmp_path / "never.safetensors"
    base = ["train", "--model", start, "--data", str(sample_folder), "--out", str(out)]
    assert main(base + ["--interactive", "--max-minutes", "1", "--patch-size", "64"]) != 0
    assert "--patch-size do(es) not apply to --interactive" in capsys.readouterr().err
    assert main(base + ["--interactive"]) != 0
    assert "give --max-minutes" in capsys.readouterr().err
    assert main(base + ["--epochs", "1", "--window", "64"]) != 0
    assert "--window goes with --interactive" in capsys.readouterr().err
    assert not out.exists()


def test_whole_mask_training_refuses_a_prompt_aware_model(prompt_checkpoint, sample_folder, tmp_path):
    import napari_medrwkv as nm
    path, _ = prompt_checkpoint
    with pytest.raises(ValueError, match="prompt-aware model .* medrwkv train --interactive"):
        nm.train(path, sample_folder, out=tmp_path / "x.safetensors", epochs=1)
    assert not (tmp_path / "x.safetensors").exists()
