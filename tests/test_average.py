"""Averaging sibling checkpoints (a model soup): engine and command line."""
import numpy as np
import pytest
import torch

import napari_medrwkv as nm
from napari_medrwkv.cli import main
from napari_medrwkv.engine.average import average_models
from napari_medrwkv.engine.checkpoint import INFERENCE_DEFAULTS, read_info, save_checkpoint


@pytest.fixture
def siblings(tmp_path):
    """The shipped nuclei model (calibrated, with recorded scores) and a copy whose floating
    weights and BatchNorm statistics moved, as a second run from the same start's would."""
    first = nm.load_model("rwkv_unet_t-dsb2018", device="cpu")
    generator = torch.Generator().manual_seed(0)
    moved = {k: v * (1 + 0.05 * torch.randn(v.shape, generator=generator)) if v.is_floating_point() else v
             for k, v in first.net.state_dict().items()}
    second = nm.load_model("rwkv_unet_t-dsb2018", device="cpu")
    second.net.load_state_dict(moved)
    path = save_checkpoint(second.net, tmp_path / "second.safetensors", second.info)
    return first, nm.load_model(str(path), device="cpu"), path


def _reference_mean(states, shares):
    """numpy's weighted average in float64, tensor by tensor (integer buffers: the first's)."""
    return {key: torch.from_numpy(np.average(np.stack([s[key].double().numpy() for s in states]), axis=0,
                                             weights=shares)) if value.is_floating_point() else value
            for key, value in states[0].items()}


def test_the_average_is_the_weighted_mean_of_every_tensor(siblings):
    first, second, path = siblings
    states = [first.net.state_dict(), second.net.state_dict()]
    for shares, weights in ((None, [1, 1]), ([1, 3], [1, 3])):
        mean = average_models(["rwkv_unet_t-dsb2018", str(path)], shares).net.state_dict()
        reference = _reference_mean(states, weights)
        assert mean.keys() == reference.keys()
        for key, value in mean.items():
            if value.is_floating_point():
                torch.testing.assert_close(value.double(), reference[key], rtol=1e-6, atol=1e-7, msg=key)
            else:
                assert torch.equal(value, reference[key]), key
        running = [k for k in mean if k.endswith("running_var")]
        assert running and not torch.equal(mean[running[0]], states[0][running[0]])   # statistics averaged too


def test_a_model_averaged_with_itself_segments_as_it_does(sample_arrays):
    image = sample_arrays[0][0]
    shipped = nm.load_model("rwkv_unet_t-dsb2018", device="cpu")
    same = average_models([shipped, "rwkv_unet_t-dsb2018"])
    # the average drops the calibrated settings, so compare with the same settings
    settings = dict(INFERENCE_DEFAULTS)
    np.testing.assert_array_equal(nm.segment(image, model=same, **settings), nm.segment(image, model=shipped, **settings))
    assert same.info.inference == INFERENCE_DEFAULTS and same.info.metrics == {}
    assert [a["source"] for a in same.info.training["averaged"]] == ["rwkv_unet_t-dsb2018"] * 2
    kept = same.info.training["averaged"][0]["training"]
    assert kept["command"] == shipped.info.training["command"] and "history" not in kept and "appearance" not in kept
    # The same training images twice: the average is suggested for them as its source is.
    assert same.info.training["appearance"]["samples"] == shipped.info.training["appearance"]["samples"]
    from napari_medrwkv.engine.model import describe_model
    assert describe_model(same.info) == "finds nucleus; the average of 2 checkpoints"     # no test score yet


def test_the_average_of_models_of_two_data_sets_keeps_the_images_of_both(sample_arrays, tmp_path):
    from conftest import untrained_checkpoint
    from napari_medrwkv.engine.appearance import appearance, appearance_profile, distance, merged_profile
    from napari_medrwkv.engine.checkpoint import save_checkpoint
    paths = []
    for i, (image, _) in enumerate(sample_arrays):
        model = nm.load_model(untrained_checkpoint(tmp_path / f"{i}.safetensors"), device="cpu")
        model.info.training["appearance"] = appearance_profile([image])
        paths.append(save_checkpoint(model.net, tmp_path / f"{i}.safetensors", model.info))
    merged = average_models(paths).info.training["appearance"]
    assert len(merged["samples"]) == 2
    assert all(distance(merged, appearance(image)) < 1e-3 for image, _ in sample_arrays)
    assert merged_profile([None, None]) is None


def test_only_siblings_are_averaged():
    with pytest.raises(ValueError, match="rwkv_unet_t-dsb2018 and rwkv_unet_t-kvasir differ in class_names"):
        average_models(["rwkv_unet_t-dsb2018", "rwkv_unet_t-kvasir"])
    with pytest.raises(ValueError, match="differ in architecture .'rwkv_unet_t' against 'med_urwkv_t'"):
        average_models(["rwkv_unet_t", "med_urwkv_t"])
    with pytest.raises(ValueError, match="at least two"):
        average_models(["rwkv_unet_t-dsb2018"])
    for shares, message in (([1], "1 shares for 2 checkpoints"), ([1, 0], "must all be positive")):
        with pytest.raises(ValueError, match=message):
            average_models(["rwkv_unet_t-dsb2018"] * 2, shares)


def test_average_command_writes_a_checkpoint_to_calibrate(siblings, tmp_path, capsys):
    _, second, path = siblings
    out = tmp_path / "soup.safetensors"
    assert main(["average", "rwkv_unet_t-dsb2018", str(path), "--shares", "1,3", "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert "rwkv_unet_t-dsb2018 25%, second 75%" in said and "calibrate" in said
    info = read_info(out)
    assert info.inference == INFERENCE_DEFAULTS and not info.metrics
    assert info.training["command"].startswith("medrwkv ")
    assert [a["share"] for a in info.training["averaged"]] == [0.25, 0.75]
    written = nm.load_model(str(out), device="cpu").net.state_dict()
    expected = average_models(["rwkv_unet_t-dsb2018", str(path)], [1, 3]).net.state_dict()
    for key in written:     # as stored: float16 where the checkpoint format keeps weights so
        torch.testing.assert_close(written[key], expected[key], rtol=1e-3, atol=1e-4, msg=key)
    before = out.read_bytes()
    for args, message in ((["--out", str(out)], "exists; pass --overwrite"),
                          (["--out", str(tmp_path / "soup.pt")], "ending in .safetensors"),
                          (["--shares", "a,b", "--out", str(tmp_path / "x.safetensors")], "--shares 'a,b'")):
        assert main(["average", "rwkv_unet_t-dsb2018", str(path), *args]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err
    assert out.read_bytes() == before
    assert main(["average", "rwkv_unet_t-dsb2018", "rwkv_unet_t-kvasir", "--out", str(tmp_path / "y.safetensors")]) == 2
    assert "differ in" in capsys.readouterr().err and not (tmp_path / "y.safetensors").exists()
