"""The shipped checkpoints load and segment real images well."""
import os
import re
import shlex
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

import napari_medrwkv as nm
from napari_medrwkv.engine.checkpoint import read_info
from napari_medrwkv.engine.datasets import find_pairs
from napari_medrwkv.engine.imageio import read_image, read_mask
from napari_medrwkv.engine.metrics import dice
from napari_medrwkv.engine.model import list_automatic
from napari_medrwkv._resources import weights_dir
from napari_medrwkv.cli import _parser

from conftest import ROOT, SAMPLES

DSB = "rwkv_unet_t-dsb2018"


def test_dsb2018_model_is_shipped_with_its_provenance():
    assert DSB in nm.list_shipped()
    info = read_info(weights_dir() / f"{DSB}.safetensors")
    assert info.architecture == "rwkv_unet_t" and info.num_classes == 1
    assert info.class_names == ["background", "nucleus"]
    assert info.training["command"].startswith("medrwkv train") and "dsb2018" in info.training["data"]
    assert info.metrics["test_dice"] >= 0.90 and info.metrics["test_n"] == 67     # the target


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
    # recorded: the least test Dice the file may carry (the targets; BUSI's on its
    # benign + malignant images, with its calibrated settings); floor: a third of the test
    # images, scored here with the file's own settings.
    "rwkv_unet_t-kvasir": dict(folder="kvasir-seg", foreground="polyp", include=None, recorded=0.85, floor=0.80),
    "rwkv_unet_t-busi": dict(folder="busi", foreground="lesion", include=["benign_*", "malignant_*"], recorded=0.75,
                             floor=0.65),
}


@pytest.mark.parametrize("name", sorted(OTHERS))
def test_polyp_and_ultrasound_models_are_shipped_with_their_provenance(name):
    spec = OTHERS[name]
    assert name in nm.list_shipped()
    info = read_info(weights_dir() / f"{name}.safetensors")
    assert info.architecture == "rwkv_unet_t" and info.class_names == ["background", spec["foreground"]]
    assert info.training["command"].startswith("medrwkv train") and spec["folder"] in info.training["data"]
    assert 0 < info.input_scale <= 1                  # trained at or below full size, segments any size
    assert info.metrics["test_dice"] >= spec["recorded"]


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


# One command per checkpoint (docs/shipped-weights.md): scripts/reproduce_weights.sh NAME runs the chain of
# `medrwkv train` steps.  Its last step must be the command recorded in the shipped file, so
# the script cannot drift from the weights it claims to reproduce.
SHIPPED = ["rwkv_unet_t-dsb2018", "rwkv_unet_t-kvasir", "rwkv_unet_t-busi", "rwkv_unet_t-interactive"]


def _reproduce_script(*args, env=None):
    return subprocess.run(["bash", str(ROOT / "scripts" / "reproduce_weights.sh"), *map(str, args)],
                          capture_output=True, text=True, encoding="utf-8", env=env)


def _recipe(name, tmp_path):
    """The `medrwkv train` steps, and the `medrwkv calibrate` after them (or None)."""
    run = _reproduce_script("--dry-run", name, tmp_path)
    assert run.returncode == 0, run.stderr
    lines = [shlex.split(line) for line in run.stdout.splitlines()]   # as a shell would read them
    if lines[-1][:2] == ["medrwkv", "calibrate"]:
        return lines[:-1], lines[-1]
    return lines, None


def _train_args(words):
    assert words[:2] == ["medrwkv", "train"], words
    return vars(_parser().parse_args(words[1:]))


@pytest.mark.parametrize("name", SHIPPED)
def test_reproduce_script_ends_with_the_command_recorded_in_the_shipped_file(name, tmp_path):
    info = read_info(weights_dir() / f"{name}.safetensors")
    train_lines, calibrate_line = _recipe(name, tmp_path)
    steps = [_train_args(words) for words in train_lines]
    assert steps[0]["model"] == "rwkv_unet_t"                      # from scratch, no hidden start
    named = [step["class_names"] for step in steps if step["class_names"]]   # a base recipe's, then renamed
    assert named[-1].split(",") == info.class_names
    for before, after in zip(steps, steps[1:]):                    # each step continues the last
        assert after["model"] == before["out"]
    final = str(tmp_path / f"{name}.safetensors")
    # A calibrated file records its calibrate command, and the recipe ends with the same one.
    assert (calibrate_line is None) == ("calibration" not in info.training)
    if calibrate_line is None:
        assert steps[-1]["out"] == final
    else:
        calibration = vars(_parser().parse_args(calibrate_line[1:]))
        recorded = vars(_parser().parse_args(shlex.split(info.training["calibration"])[1:]))
        assert calibration["model"] == steps[-1]["out"] and calibration["out"] == final
        ignore = {"model", "out", "data", "run", "device"}
        assert {k: v for k, v in calibration.items() if k not in ignore} == \
               {k: v for k, v in recorded.items() if k not in ignore}
        assert " val (" in info.metrics["calibrated_on"]                # chosen on val, never on test
        assert info.metrics["calibrated_dice"] >= info.metrics["uncalibrated_dice"]

    recorded = _train_args(shlex.split(info.training["command"]))
    ignore = {"model", "out", "device", "data", "extra_data", "run"}   # paths of the machine it ran on
    assert {k: v for k, v in steps[-1].items() if k not in ignore} == \
           {k: v for k, v in recorded.items() if k not in ignore}
    assert Path(steps[-1]["data"]).name == Path(recorded["data"]).name
    assert [Path(f).name for f in steps[-1]["extra_data"] or []] == [Path(f).name for f in recorded["extra_data"] or []]


def test_the_click_to_fix_model_is_shipped_with_its_provenance():
    name = "rwkv_unet_t-interactive"
    info = read_info(weights_dir() / f"{name}.safetensors")
    assert info.prompt_channels == 4 and info.class_names == ["background", "object"]
    assert info.training["interactive"] and info.training["command"].startswith("medrwkv train")
    assert sorted(Path(f).name for f in info.training["data"]) == ["busi", "dsb2018", "kvasir-seg"]
    assert name in nm.list_shipped() and name not in list_automatic()     # it takes clicks: refine, not segment


def test_reproduce_script_keeps_a_work_folder_with_spaces_and_quotes_in_one_word(tmp_path):
    # Its printed commands are the very argument lists it runs: each must read back, pasted into
    # a shell, as the same words (a stem pattern unexpanded, the folder one argument).
    workdir = tmp_path / "Dr O'Neil's runs"
    train_lines, calibrate_line = _recipe("rwkv_unet_t-busi", workdir)
    steps = [_train_args(words) for words in train_lines]
    for before, after in zip(steps, steps[1:]):
        assert after["model"] == before["out"]
    # the polyp recipe first, into its own folder inside the work folder; then the ultrasound steps
    assert steps[0]["out"] == str(workdir / "rwkv_unet_t-kvasir" / "step-1.safetensors")
    assert steps[-1]["out"] == str(workdir / "step-1.safetensors")
    assert steps[-1]["val_include"] == "benign_*,malignant_*"
    calibration = vars(_parser().parse_args(calibrate_line[1:]))
    assert calibration["model"] == steps[-1]["out"] and calibration["out"] == str(workdir / "rwkv_unet_t-busi.safetensors")
    assert calibration["include"] == "benign_*,malignant_*"


def test_reproduce_script_refuses_an_unknown_name(tmp_path):
    run = _reproduce_script("rwkv_unet_t-nope", tmp_path)
    assert run.returncode != 0 and "unknown checkpoint 'rwkv_unet_t-nope'" in run.stderr
    assert not any(tmp_path.iterdir())


def test_reproduce_script_names_the_missing_data_folder(tmp_path):
    env = dict(os.environ, MEDRWKV_DATA=str(tmp_path / "nowhere"))
    run = _reproduce_script("rwkv_unet_t-busi", tmp_path / "w", env=env)
    assert run.returncode == 1 and str(tmp_path / "nowhere" / "busi") in run.stderr and "MEDRWKV_DATA" in run.stderr
    assert not (tmp_path / "w").exists()


@pytest.mark.skipif(not (ROOT / ".venv" / "bin" / "python").exists() or torch.cuda.is_available(),
                    reason="checks the refusal on a machine without a GPU, with the repository's .venv")
def test_reproduce_script_refuses_gpu_steps_up_front_without_a_gpu(tmp_path):
    (tmp_path / "kvasir-seg" / "images").mkdir(parents=True)
    env = dict(os.environ, MEDRWKV_DATA=str(tmp_path))
    run = _reproduce_script("rwkv_unet_t-kvasir", tmp_path / "w", env=env)
    assert run.returncode == 1 and "--device cuda" in run.stderr and "sees none" in run.stderr
    assert not (tmp_path / "w").exists()             # nothing trained, nothing written


def test_docs_give_one_reproduce_command_per_shipped_checkpoint():
    doc = (ROOT / "docs" / "shipped-weights.md").read_text(encoding="utf-8")
    names = re.findall(r"^scripts/reproduce_weights\.sh (\S+)$", doc, re.M)
    assert sorted(names) == sorted(nm.list_shipped()) == sorted(SHIPPED)
    # Each one alone on its line inside a code block, where a reader copies it from.
    in_code = [line for block in re.findall(r"^```[^\n]*\n(.*?)^```", doc, re.M | re.S)
               for line in block.splitlines() if line.startswith("scripts/reproduce_weights.sh ")]
    assert sorted(in_code) == sorted(f"scripts/reproduce_weights.sh {name}" for name in SHIPPED)
