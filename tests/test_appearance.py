"""Suggesting the model trained on images like the user's: features, profiles, train, the CLI.

The widget's part is in test_segment_widget.py.
"""
import numpy as np
import pytest

from conftest import SAMPLES, untrained_checkpoint
from napari_medrwkv.engine.appearance import (FEATURES, MAX_DISTANCE, PROFILE_IMAGES, appearance, appearance_profile,
                                              central_crop, distance, evenly_spaced, profile_of, suggest_model)
from napari_medrwkv.engine.checkpoint import read_info, write_info
from napari_medrwkv.engine.datasets import find_pairs
from napari_medrwkv.engine.imageio import read_image
from napari_medrwkv.engine.model import list_shipped, shipped_path


def _blobs(seed, shape=(200, 240), dark=True):
    """Fluorescence-like (bright blobs on black) or its inverse, grey."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    image = np.zeros(shape)
    for y, x in rng.uniform((0, 0), shape, (25, 2)):
        image += np.exp(-((yy - y) ** 2 + (xx - x) ** 2) / 60)
    image = np.clip(image, 0, 1)
    return ((image if dark else 1 - image) * 255).astype(np.uint8)


def _colour(seed, shape=(200, 240)):
    """A reddish colour photograph-like image with texture."""
    rng = np.random.default_rng(seed)
    base = np.stack([np.full(shape, 190), np.full(shape, 90), np.full(shape, 70)], -1).astype(float)
    return np.clip(base + rng.normal(0, 25, shape + (3,)), 0, 255).astype(np.uint8)


def test_features_do_not_depend_on_dtype_exposure_or_grey_storage():
    image = _blobs(0)
    f = appearance(image)
    assert f.shape == (len(FEATURES),) and np.all(f >= -1) and np.all(f <= 10)
    assert np.allclose(appearance(image.astype(np.uint16) * 257), f)                 # 16-bit of the same picture
    assert np.allclose(appearance(image.astype(np.float32) * 0.001 + 5), f, atol=1e-6)
    assert np.allclose(appearance(np.stack([image] * 3, -1)), f)                      # grey stored as RGB
    assert f[0] == 0 and f[1] == 0                                                   # grey has no colour
    assert f[4] > 0.5 and appearance(_blobs(0, dark=False))[4] < 0.1                  # dark fraction
    colour = appearance(_colour(0))
    assert colour[0] > 0.2 and colour[1] > 0.2                                        # colourful, red over blue


def test_features_read_only_the_central_crop_of_a_large_image():
    big = np.zeros((3000, 2001), dtype=np.uint8)
    crop = central_crop(big)
    assert crop.shape == (512, 512) and np.shares_memory(crop, big)
    big[1244:1756, 744:1256] = _blobs(1, (512, 512))            # the centre holds the picture, the rest is black
    assert np.allclose(appearance(big), appearance(big[1244:1756, 744:1256]))
    assert central_crop(np.zeros((100, 700))).shape == (100, 512)


def test_profile_keeps_each_image_and_measures_distance_to_the_nearest():
    images = [_blobs(s) for s in range(5)]
    profile = appearance_profile(images)
    assert profile["features"] == list(FEATURES) and len(profile["samples"]) == 5
    for image in images:
        assert distance(profile, appearance(image)) < 1e-3
    assert distance(profile, appearance(_colour(0))) > MAX_DISTANCE
    with pytest.raises(ValueError, match="at least one image"):
        appearance_profile([])
    assert evenly_spaced(list(range(10)), 4) == [0, 3, 6, 9] and evenly_spaced([1, 2], 4) == [1, 2]


def test_profile_of_ignores_missing_or_foreign_profiles(tmp_path):
    info = read_info(untrained_checkpoint(tmp_path / "a.safetensors"))
    assert profile_of(info) is None
    info.training["appearance"] = {"features": ["something else"], "samples": [[0.0]]}
    assert profile_of(info) is None
    info.training["appearance"] = appearance_profile([_blobs(0)])
    assert profile_of(info)["samples"]


@pytest.fixture
def two_models(tmp_path):
    """A 'fluorescence' and a 'colour' checkpoint, each with the profile of its kind of image, and one
    without a profile and one damaged file, which are no candidates."""
    paths = {}
    for name, make in (("dark", _blobs), ("colour", _colour)):
        path = untrained_checkpoint(tmp_path / f"{name}.safetensors")
        info = read_info(path)
        info.training["appearance"] = appearance_profile([make(s) for s in range(8)])
        write_info(path, info)
        paths[name] = path
    paths["plain"] = untrained_checkpoint(tmp_path / "plain.safetensors")
    (tmp_path / "broken.safetensors").write_bytes(b"not a checkpoint")
    paths["broken"] = str(tmp_path / "broken.safetensors")
    return paths


def test_suggests_the_model_trained_on_images_like_this_one(two_models):
    sources = list(two_models.values())
    assert suggest_model(_blobs(100), sources).source == two_models["dark"]
    assert suggest_model(_colour(100), sources).source == two_models["colour"]
    suggestion = suggest_model(_blobs(100), sources)
    assert 0 <= suggestion.distance <= MAX_DISTANCE
    # A bright image with dark spots is like neither: nothing is suggested rather than a poor match.
    assert suggest_model(_blobs(100, dark=False), sources) is None
    assert suggest_model(_blobs(100), [two_models["plain"], two_models["broken"]]) is None


def test_train_records_the_appearance_of_its_training_images(sample_arrays, tmp_path):
    from napari_medrwkv.engine.train import TrainConfig, train
    result = train("ds_vrwkv_t", sample_arrays, out=tmp_path / "m.safetensors", epochs=1, device="cpu",
                   config=TrainConfig(patch_size=64, batch_size=2, samples_per_epoch=2, num_workers=0))
    profile = profile_of(read_info(result.path))
    assert profile is not None and len(profile["samples"]) == 1         # one of the two pairs trains, one validates
    assert sorted(distance(profile, appearance(image)) < 1e-3 for image, _ in sample_arrays) == [False, True]


def test_cli_records_a_profile_and_leaves_the_weights_as_they_are(sample_folder, tmp_path, capsys):
    from safetensors.torch import load_file

    from napari_medrwkv.cli import main
    path = untrained_checkpoint(tmp_path / "m.safetensors")
    before = load_file(path)
    assert main(["appearance", "--model", path, "--data", str(sample_folder)]) == 0
    assert "recorded the appearance of" in capsys.readouterr().out
    profile = profile_of(read_info(path))
    assert len(profile["samples"]) == 2 and "2 images" in profile["measured_on"]
    assert profile["command"].startswith("medrwkv")
    after = load_file(path)
    assert before.keys() == after.keys() and all(np.array_equal(before[k], after[k]) for k in before)
    assert suggest_model(read_image(SAMPLES / "nuclei_fluorescence.png"), [path]).source == path


def test_cli_names_a_model_that_is_no_checkpoint_file(sample_folder, tmp_path, capsys):
    from napari_medrwkv.cli import main
    assert main(["appearance", "--model", str(tmp_path / "none.safetensors"), "--data", str(sample_folder)]) != 0
    err = capsys.readouterr().err
    assert "none.safetensors" in err and "appearance stores the profile in a checkpoint file" in err


def test_every_shipped_model_carries_a_profile_and_the_samples_get_the_nuclei_model():
    # The prompt-aware model segments nothing on its own: it is never suggested, and has no profile.
    from napari_medrwkv.engine.model import list_automatic
    assert set(list_shipped()) - set(list_automatic()) <= {"rwkv_unet_t-interactive"}
    for name in list_automatic():
        profile = profile_of(read_info(shipped_path(name)))
        assert profile is not None and len(profile["samples"]) == PROFILE_IMAGES, name
    for sample in ("nuclei_fluorescence", "nuclei_brightfield"):
        assert suggest_model(read_image(SAMPLES / f"{sample}.png")).source == "rwkv_unet_t-dsb2018"


@pytest.mark.parametrize("folder, model", [("kvasir-seg", "rwkv_unet_t-kvasir"), ("busi", "rwkv_unet_t-busi"),
                                           ("dsb2018", "rwkv_unet_t-dsb2018")])
def test_unseen_test_images_get_the_model_trained_on_their_kind(folder, model, shared_data):
    pairs = find_pairs(shared_data / folder, "test")
    picked = [suggest_model(read_image(pair.image)) for pair in pairs]
    right = sum(s is not None and s.source == model for s in picked)
    assert right >= 0.95 * len(pairs), (right, len(pairs))     # measured: 100, 78 and 64 of 100, 78 and 67


SHIPPED_ON = {"kvasir-seg": "rwkv_unet_t-kvasir", "busi": "rwkv_unet_t-busi", "dsb2018": "rwkv_unet_t-dsb2018"}


@pytest.mark.parametrize("folder", list(SHIPPED_ON))
def test_a_kind_no_model_was_trained_on_gets_no_suggestion(folder, shared_data):
    # Each set in turn plays a kind of image none of the models knows: left out with its model,
    # its images must not be given one of the other two.  A fixed distance of 3.0 gave them one
    # for 43%, 100% and 89% of the Kvasir-SEG, BUSI and DSB2018 val and test images.
    others = [model for name, model in SHIPPED_ON.items() if name != folder]
    pairs = find_pairs(shared_data / folder, "val") + find_pairs(shared_data / folder, "test")
    proposed = sum(suggest_model(read_image(pair.image), others) is not None for pair in pairs)
    assert proposed <= 0.1 * len(pairs), (proposed, len(pairs))     # measured: 0, 3 and 7 of 200, 156 and 133


@pytest.mark.parametrize("folder", list(SHIPPED_ON))
def test_a_model_fine_tuned_on_a_few_images_of_a_new_kind_wins_for_that_kind(folder, shared_data, tmp_path):
    # A model fine-tuned on five of the user's slices of a kind no shipped model knows (each set in
    # turn, its model left out): its profile of five images must beat the 256 of the shipped models
    # for the next images of that kind, and not take the shipped models' own images from them.
    train = find_pairs(shared_data / folder, "train")
    chosen = np.random.default_rng(0).choice(len(train), 5, replace=False)
    tuned = untrained_checkpoint(tmp_path / "tuned.safetensors")
    info = read_info(tuned)
    info.training["appearance"] = appearance_profile(read_image(train[i].image) for i in chosen)
    write_info(tuned, info)
    others = [model for name, model in SHIPPED_ON.items() if name != folder]
    tests = find_pairs(shared_data / folder, "test")[::2]
    won = sum(getattr(suggest_model(read_image(p.image), others + [tuned]), "source", None) == tuned for p in tests)
    assert won >= 0.75 * len(tests), (won, len(tests))
    # Fine-tuned from the set's own model instead: suggested over that model for images like its slices
    # (the rule before: for 0-3% of them).
    info.training["base"] = SHIPPED_ON[folder]
    write_info(tuned, info)
    everyone = list(SHIPPED_ON.values()) + [tuned]
    over_own = sum(getattr(suggest_model(read_image(p.image), everyone), "source", None) == tuned for p in tests)
    assert over_own >= 0.75 * len(tests), (over_own, len(tests))
    info.training.pop("base")
    write_info(tuned, info)
    for other, model in SHIPPED_ON.items():
        if other != folder:
            theirs = find_pairs(shared_data / other, "test")[::4]
            picks = [suggest_model(read_image(p.image), list(SHIPPED_ON.values()) + [tuned]) for p in theirs]
            taken = sum(getattr(pick, "source", None) == tuned for pick in picks)
            assert taken <= 0.05 * len(theirs), (other, taken, len(theirs))


def _blue():
    """Saturated blue: like no shipped model's training images."""
    blue = np.stack([np.full((64, 80), 20), np.tile(np.linspace(0, 120, 80), (64, 1)), np.full((64, 80), 230)], -1)
    return blue.astype(np.uint8)


def test_cli_segment_auto_uses_the_model_suggested_for_each_image(sample_folder, tmp_path, capsys):
    import tifffile

    from napari_medrwkv.cli import main
    images = sample_folder / "images"
    nuclei = read_image(images / "nuclei_fluorescence.png")[:64, :80]            # RGB, (64, 80, 3)
    # A stack is judged by its middle slice: here the nuclei, between two blue slices.
    stack = np.stack([_blue(), nuclei, _blue()])
    tifffile.imwrite(tmp_path / "stack.tif", stack)
    assert main(["segment", "--model", "auto", "--out", str(tmp_path / "auto"), str(images),
                 str(tmp_path / "stack.tif")]) == 0
    assert "rwkv_unet_t-dsb2018: 3" in capsys.readouterr().out
    assert main(["segment", "--model", "rwkv_unet_t-dsb2018", "--out", str(tmp_path / "named"), str(images)]) == 0
    for name in ("nuclei_fluorescence", "nuclei_brightfield"):
        auto, named = (read_image(tmp_path / out / f"{name}_labels.png") for out in ("auto", "named"))
        assert np.array_equal(auto, named) and auto.any()


def test_cli_segment_auto_names_an_image_no_model_fits_and_writes_nothing(sample_folder, tmp_path, capsys):
    from PIL import Image

    from napari_medrwkv.cli import main
    Image.fromarray(_blue()).save(tmp_path / "blue.png")
    out = tmp_path / "out"
    assert main(["segment", "--model", "auto", "--out", str(out), str(sample_folder / "images"),
                 str(tmp_path / "blue.png")]) != 0
    err = capsys.readouterr().err
    assert "blue.png" in err and "none of the shipped models" in err and "--model" in err
    assert not out.exists()
