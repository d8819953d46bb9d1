"""The shipped checkpoints load and segment real images well."""
import numpy as np
import pytest

import napari_medrwkv as nm
from napari_medrwkv.engine.checkpoint import read_info
from napari_medrwkv.engine.data import find_pairs, read_image, read_mask
from napari_medrwkv.engine.metrics import dice
from napari_medrwkv._resources import weights_dir

from conftest import SAMPLES

DSB = "rwkv_unet_t-dsb2018"


def test_dsb2018_model_is_shipped_with_its_provenance():
    assert DSB in nm.list_shipped()
    info = read_info(weights_dir() / f"{DSB}.safetensors")
    assert info.architecture == "rwkv_unet_t" and info.num_classes == 1
    assert info.class_names == ["background", "nucleus"]
    assert info.training["command"].startswith("medrwkv train") and "dsb2018" in info.training["data"]
    assert info.metrics["test_dice"] > 0.85 and info.metrics["test_n"] == 67


@pytest.mark.parametrize("name", ["nuclei_fluorescence", "nuclei_brightfield"])
def test_dsb2018_model_finds_the_nuclei_of_the_samples(name):
    # The samples come from the train split: a check that the weights load and work, not a score.
    model = nm.load_model(DSB, device="cpu")
    labels = nm.segment(read_image(SAMPLES / f"{name}.png"), model=model)
    assert dice(labels, read_mask(SAMPLES / f"{name}_mask.png", 1)) > 0.85


def test_dsb2018_model_on_unseen_test_images(shared_data):
    model = nm.load_model(DSB, device="cpu")
    pairs = find_pairs(shared_data / "dsb2018", "test")[::4]       # 17 of the 67, for time
    scores = nm.evaluate(model, pairs)
    assert scores["n"] == 17 and scores["dice"] > 0.85


# The polyp and ultrasound models: trained on data that may not be bundled, so their
# score checks need ../shared/data; provenance and metadata are checked everywhere.
OTHERS = {
    "rwkv_unet_t-kvasir": dict(folder="kvasir-seg", foreground="polyp", include=None, floor=0.80),
    "rwkv_unet_t-busi": dict(folder="busi", foreground="lesion", include=["benign_*", "malignant_*"], floor=0.65),
}


@pytest.mark.parametrize("name", sorted(OTHERS))
def test_polyp_and_ultrasound_models_are_shipped_with_their_provenance(name):
    spec = OTHERS[name]
    assert name in nm.list_shipped()
    info = read_info(weights_dir() / f"{name}.safetensors")
    assert info.architecture == "rwkv_unet_t" and info.class_names == ["background", spec["foreground"]]
    assert info.training["command"].startswith("medrwkv train") and spec["folder"] in info.training["data"]
    assert 0 < info.input_scale < 1                   # trained on downsized images, segments any size
    assert info.metrics["test_dice"] > spec["floor"]


@pytest.mark.parametrize("name", sorted(OTHERS))
def test_polyp_and_ultrasound_models_on_unseen_test_images(name, shared_data):
    spec = OTHERS[name]
    model = nm.load_model(name, device="cpu")
    pairs = find_pairs(shared_data / spec["folder"], "test")
    if spec["include"]:
        pairs = [p for p in pairs if p.stem.split("_")[0] + "_*" in spec["include"]]
    pairs = pairs[::3]
    image = read_image(pairs[0].image)
    assert nm.segment(image, model=model).shape == image.shape[:2]
    assert nm.evaluate(model, pairs)["dice"] > spec["floor"]
