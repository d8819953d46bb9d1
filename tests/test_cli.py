"""The medrwkv command line, as a user runs it."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch

from napari_medrwkv.cli import main
from napari_medrwkv.engine.checkpoint import ModelInfo, read_info, save_checkpoint
from napari_medrwkv.models import create_model


def test_models_lists_architectures(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "architectures:" in out and "rwkv_unet_t" in out and "ds_vrwkv_t" in out


def test_segment_writes_labels_and_never_overwrites_silently(sample_folder, tmp_path, capsys):
    out = tmp_path / "labels"
    inputs = [str(p) for p in sorted((sample_folder / "images").iterdir())]
    assert main(["segment", "--model", "ds_vrwkv_t", "--device", "cpu", *inputs, "--out", str(out)]) == 0
    written = sorted(p.name for p in out.iterdir())
    assert written == ["nuclei_brightfield_labels.png", "nuclei_fluorescence_labels.png"]
    before = (out / written[0]).read_bytes()
    assert "segment: 100%" in capsys.readouterr().err          # the progress bar ran to its end
    assert main(["segment", "--model", "ds_vrwkv_t", *inputs, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--overwrite" in err
    assert (out / written[0]).read_bytes() == before
    assert main(["segment", "--model", "ds_vrwkv_t", *inputs, "--out", str(out), "--overwrite"]) == 0


def test_segment_takes_folders_and_leaves_its_own_outputs_alone(sample_folder, tmp_path, capsys):
    images = sample_folder / "images"
    (images / "notes.txt").write_text("not an image")
    out = tmp_path / "labels"
    assert main(["segment", "--model", "ds_vrwkv_t", "--device", "cpu", str(images), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["nuclei_brightfield_labels.png", "nuclei_fluorescence_labels.png"]
    # into the images' own folder, twice: the second run segments the images again, not the first run's labels
    for extra in ([], ["--overwrite"]):
        assert main(["segment", "--model", "ds_vrwkv_t", "--probabilities", str(images), "--out", str(images),
                     *extra]) == 0
    assert sorted(p.name for p in images.iterdir()) == [
        "notes.txt", "nuclei_brightfield.png", "nuclei_brightfield_labels.png", "nuclei_brightfield_probabilities.tif",
        "nuclei_fluorescence.png", "nuclei_fluorescence_labels.png", "nuclei_fluorescence_probabilities.tif"]
    assert "wrote 2 label image(s)" in capsys.readouterr().out
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["segment", "--model", "ds_vrwkv_t", str(empty), "--out", str(tmp_path / "none")]) == 2
    assert "has no image files" in capsys.readouterr().err and not (tmp_path / "none").exists()


def test_segment_refuses_before_any_work(sample_folder, tmp_path, capsys):
    image = sample_folder / "images" / "nuclei_brightfield.png"
    out = tmp_path / "out"
    # two images with one name would write one label file, the second over the first
    other = tmp_path / "other"
    other.mkdir()
    (other / image.name).write_bytes(image.read_bytes())
    assert main(["segment", "--model", "ds_vrwkv_t", str(image), str(other / image.name), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(image) in err and str(other / image.name) in err
    # a missing image among the inputs fails before the first is segmented
    assert main(["segment", "--model", "ds_vrwkv_t", str(image), str(tmp_path / "gone.png"), "--out", str(out)]) == 2
    assert "gone.png does not exist" in capsys.readouterr().err
    assert not out.exists()
    # an earlier run's probabilities are kept unless --overwrite, like its labels
    out.mkdir()
    (out / "nuclei_brightfield_probabilities.tif").write_bytes(b"earlier run")
    assert main(["segment", "--model", "ds_vrwkv_t", "--probabilities", str(image), "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "nuclei_brightfield_probabilities.tif").read_bytes() == b"earlier run"
    assert sorted(p.name for p in out.iterdir()) == ["nuclei_brightfield_probabilities.tif"]


def test_results_get_the_permissions_of_any_new_file(sample_folder, tmp_path):
    # written through a temporary file (mkstemp: 0600) and renamed; they must end as the umask says
    import os
    import stat
    out = tmp_path / "out"
    ckpt = tmp_path / "m.safetensors"
    old = os.umask(0o022)
    try:
        assert main(["segment", "--model", "ds_vrwkv_t", str(sample_folder / "images"), "--out", str(out)]) == 0
        save_checkpoint(create_model("ds_vrwkv_t"), ckpt, ModelInfo(architecture="ds_vrwkv_t", in_chans=3, num_classes=1))
    finally:
        os.umask(old)
    for path in [*out.iterdir(), ckpt]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path


def test_train_then_evaluate_json(sample_folder, tmp_path):
    ckpt = tmp_path / "m.safetensors"
    run = [sys.executable, "-m", "napari_medrwkv.cli"]
    train = subprocess.run(run + ["train", "--model", "ds_vrwkv_t", "--data", str(sample_folder), "--epochs", "1",
                                  "--patch-size", "48", "--batch-size", "2", "--samples-per-epoch", "4",
                                  "--input-scale", "0.5", "--foreground", "0.5", "--ema", "0.9", "--device", "cpu",
                                  "--val-include", "nuclei_*", "--out", str(ckpt)],
                           capture_output=True, text=True, encoding="utf-8")
    assert train.returncode == 0, train.stderr
    assert ckpt.exists() and "best epoch 1" in train.stdout
    # an existing checkpoint is not replaced by the next run into the same --out, unless asked
    before = ckpt.read_bytes()
    again = subprocess.run(run + ["train", "--model", "ds_vrwkv_t", "--data", str(sample_folder), "--epochs", "1",
                                  "--device", "cpu", "--out", str(ckpt)], capture_output=True, text=True, encoding="utf-8")
    assert again.returncode == 2 and "--overwrite" in again.stderr and "epoch" not in again.stdout
    assert ckpt.read_bytes() == before
    assert read_info(ckpt).input_scale == 0.5
    assert read_info(ckpt).training["config"]["foreground"] == 0.5
    assert read_info(ckpt).training["config"]["ema"] == 0.9
    assert read_info(ckpt).training["val_include"] == ["nuclei_*"]
    ev = subprocess.run(run + ["evaluate", "--model", str(ckpt), "--data", str(sample_folder), "--json"],
                        capture_output=True, text=True, encoding="utf-8")
    assert ev.returncode == 0, ev.stderr
    scores = json.loads(ev.stdout.strip().splitlines()[-1])
    assert scores["n"] == 2 and {"dice", "iou", "hd95"} <= scores.keys()
    one = subprocess.run(run + ["evaluate", "--model", str(ckpt), "--data", str(sample_folder), "--json",
                                "--include", "nuclei_bright*"], capture_output=True, text=True, encoding="utf-8")
    scores = json.loads(one.stdout.strip().splitlines()[-1])
    assert scores["n"] == 1 and scores["per_image"][0]["name"] == "nuclei_brightfield"
    # from those trained weights, a blend of the best epoch with them, or them, and the line says which
    tuned = tmp_path / "tuned.safetensors"
    again = subprocess.run(run + ["train", "--model", str(ckpt), "--data", str(sample_folder), "--epochs", "1",
                                  "--patch-size", "48", "--batch-size", "2", "--samples-per-epoch", "4",
                                  "--blend", "0.5", "--device", "cpu", "--out", str(tuned)], capture_output=True, text=True, encoding="utf-8")
    assert again.returncode == 0, again.stderr
    training = read_info(tuned).training
    if training["best_epoch"] == 0:
        said, blend = "no epoch beat the starting weights", 1.0
    elif training["blend_val_dice"] < read_info(tuned).metrics["val_dice"]:      # the epoch alone scored higher
        said, blend = f"best epoch 1 alone (its blend with the starting weights: val Dice " \
                      f"{training['blend_val_dice']:.4f})", 1.0
    else:
        said, blend = "best epoch 1 blended with the starting weights (50% the epoch's)", 0.5
    assert said in again.stdout and training["blend"] == blend
    assert again.stdout.startswith(f"starting weights: val Dice {training['start_val_dice']:.4f}\n")


def test_evaluate_record_stores_scores_and_keeps_weights(sample_folder, tmp_path, capsys):
    ckpt = tmp_path / "m.safetensors"
    save_checkpoint(create_model("ds_vrwkv_t"), ckpt, ModelInfo(architecture="ds_vrwkv_t", in_chans=3, num_classes=1,
                                                                         metrics={"val_dice": 0.5}))
    weights = safetensors.torch.load_file(str(ckpt))
    assert main(["evaluate", "--model", str(ckpt), "--data", str(sample_folder), "--json", "--record"]) == 0
    scores = json.loads(capsys.readouterr().out.strip().splitlines()[-1])      # JSON stays the last line
    metrics = read_info(ckpt).metrics
    assert metrics["all_dice"] == pytest.approx(scores["dice"]) and metrics["all_n"] == 2
    assert metrics["all_split"] == f"{sample_folder.name} all (2 images)" and metrics["val_dice"] == 0.5
    after = safetensors.torch.load_file(str(ckpt))
    assert after.keys() == weights.keys() and all(torch.equal(after[k], weights[k]) for k in weights)
    # scores with test-time flips say so
    assert main(["evaluate", "--model", str(ckpt), "--data", str(sample_folder), "--flips", "--json", "--record"]) == 0
    flipped = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    metrics = read_info(ckpt).metrics
    assert metrics["all_split"] == f"{sample_folder.name} all (2 images; test-time flips)"
    assert metrics["all_dice"] == pytest.approx(flipped["dice"])
    # an architecture has no file to record into: refused before any evaluation
    assert main(["evaluate", "--model", "ds_vrwkv_t", "--data", str(sample_folder), "--record"]) == 2
    assert "--record" in capsys.readouterr().err


def test_bad_input_is_one_line_and_nonzero(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    assert main(["evaluate", "--model", "ds_vrwkv_t", "--data", str(missing)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(missing) in err
    assert main(["train", "--model", "rwkv_unet_t", "--data", str(tmp_path), "--out", str(tmp_path / "x.pt")]) == 2
    assert ".safetensors" in capsys.readouterr().err
    assert main(["evaluate", "--model", "ds_vrwkv_t", "--data", str(tmp_path), "--include", "benign_*"]) == 2
    capsys.readouterr()
    for argument, value in (("--input-scale", "0"), ("--blend", "1.5")):      # out of range: refused by argparse
        with pytest.raises(SystemExit) as exit_:
            main(["train", "--model", "ds_vrwkv_t", "--data", str(tmp_path), argument, value,
                  "--out", str(tmp_path / "x.safetensors")])
        err = capsys.readouterr().err.strip()
        assert exit_.value.code == 2 and len(err.splitlines()) == 1 and f"argument {argument}: '{value}'" in err


def test_console_script_is_installed():
    script = Path(sys.executable).parent / "medrwkv"      # the venv's console script
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True, encoding="utf-8")
    assert result.returncode == 0 and "segment" in result.stdout
