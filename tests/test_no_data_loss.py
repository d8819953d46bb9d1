"""Nothing lost, ever: what users do to the command line and the API that could lose a file or
finished work, tried for real (processes, signals, races, bad arguments).  Each test covers a
class of problem: an input as a write target, two writers into one place, an interrupt or a
kill while training or writing, a failed write, out-of-range arguments, bad image files.
Every failure must be one line without a traceback, and no file that existed may change.
"""
import hashlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from napari_medrwkv.cli import main
from napari_medrwkv.engine.checkpoint import load_checkpoint
from napari_medrwkv.engine.imageio import atomic_file, read_image, write_labels

from conftest import SAMPLES, untrained_checkpoint

CLI = [sys.executable, "-m", "napari_medrwkv.cli"]
FAST_TRAIN = ["--patch-size", "48", "--batch-size", "2", "--samples-per-epoch", "4", "--device", "cpu", "--workers", "0"]


def hashes(folder: Path) -> dict:
    """Every file under ``folder`` (hidden ones too) with the hash of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def one_line_error(err: str) -> str:
    """The one line of a failure's stderr (progress bars aside), with no traceback."""
    lines = [line for line in err.replace("\r", "\n").splitlines()
             if line.strip() and not re.match(r"^\w+:\s+\d+%\|", line)]
    assert "Traceback" not in err and len(lines) == 1, err
    return lines[0]


def run_cli(*args, **kwargs):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "MEDRWKV_TRACEBACK": ""}
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, encoding="utf-8", env=env, **kwargs)


# ------------------------------------------------------------------- an input is never a write target

def test_an_input_named_like_an_output_is_never_written_over(tmp_path, capsys):
    """``a.png`` with ``a_labels.png`` (or ``a_probabilities.tif``, or a hard link to either)
    given as inputs, into their own folder: refused with and without --overwrite."""
    image_bytes = (SAMPLES / "nuclei_brightfield.png").read_bytes()
    for case, (other, target) in enumerate((("a_labels.png", "a_labels.png"),
                                             ("a_probabilities.tif", "a_probabilities.tif"),
                                             ("linked.png", "a_labels.png"))):
        folder = tmp_path / str(case)
        folder.mkdir()
        (folder / "a.png").write_bytes(image_bytes)
        if other.endswith(".tif"):
            write_labels(folder / other, np.ones((256, 320), np.float32))
        else:
            (folder / target).write_bytes((SAMPLES / "nuclei_fluorescence.png").read_bytes())
            if other != target:
                os.link(folder / target, folder / other)
        before = hashes(folder)
        for extra in ([], ["--overwrite"], ["--skip-existing"]):
            extra = extra + (["--probabilities"] if target.endswith(".tif") else [])
            code = main(["segment", "--model", "ds_vrwkv_t", str(folder / "a.png"), str(folder / other),
                         "--out", str(folder), *extra])
            line = one_line_error(capsys.readouterr().err)
            assert code == 2 and "input" in line and str(folder / target) in line, (extra, line)
            assert hashes(folder) == before, (other, extra)


# ------------------------------------------------------------------- two writers, one place

def _publish(args):
    """In a child process: wait for the start signal, then write ``payload`` to ``path`` without overwrite."""
    path, payload, start = args
    while time.time() < start:
        pass
    try:
        write_labels(path, np.full((8, 8), payload, dtype=np.uint8), overwrite=False)
        return "won"
    except FileExistsError:
        return "refused"


def test_two_processes_writing_one_file_exactly_one_wins(tmp_path):
    import multiprocessing
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(2) as pool:
        for trial in range(20):
            target = tmp_path / f"t{trial}_labels.png"
            start = time.time() + 0.2
            outcomes = pool.map(_publish, [(target, 1, start), (target, 2, start)], chunksize=1)
            assert sorted(outcomes) == ["refused", "won"], outcomes
            winner = outcomes.index("won") + 1
            assert np.all(read_image(target) == winner)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"t{i}_labels.png" for i in range(20))   # no temp


def test_two_segment_runs_into_one_folder_one_wins_and_nothing_is_replaced(sample_folder, tmp_path):
    out = tmp_path / "labels"
    images = sample_folder / "images"
    runs = [subprocess.Popen([*CLI, "segment", "--model", "ds_vrwkv_t", "--device", "cpu", str(images),
                              "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, encoding="utf-8")
            for _ in range(2)]
    results = [(r.wait(timeout=120), *r.communicate()) for r in runs]
    codes = sorted(code for code, _, _ in results)
    assert codes[0] == 0 and codes[1] != 0, results
    loser = next(err for code, _, err in results if code != 0)
    assert "exists" in one_line_error(loser)
    assert sorted(p.name for p in out.iterdir()) == ["nuclei_brightfield_labels.png", "nuclei_fluorescence_labels.png"]


def test_a_checkpoint_made_while_training_ran_is_kept_and_the_work_saved_beside_it(sample_folder, tmp_path):
    from napari_medrwkv.engine.train import TrainConfig, train
    out = tmp_path / "tuned.safetensors"
    theirs = b"another run's model"

    def progress(p):                       # another run finishes into the same place while this one trains
        if p.epoch == 1 and p.step == 1 and not out.exists():
            out.write_bytes(theirs)

    result = train("ds_vrwkv_t", str(sample_folder), out=out, epochs=1, device="cpu", progress=progress,
                   config=TrainConfig(patch_size=48, batch_size=2, samples_per_epoch=4, num_workers=0),
                   overwrite=False)
    assert out.read_bytes() == theirs
    assert result.path == tmp_path / "tuned.1.safetensors" and "left as it is" in result.moved
    load_checkpoint(result.path)


def test_a_folder_gone_at_the_end_of_training_sends_the_weights_to_the_temporary_folder(sample_folder, tmp_path,
                                                                                       monkeypatch):
    from napari_medrwkv.engine.train import TrainConfig, train
    rescue = tmp_path / "tmp"
    rescue.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(rescue))
    folder = tmp_path / "usb"
    folder.mkdir()

    def progress(p):                       # the disk is unplugged while training runs
        if folder.exists():
            folder.rmdir()

    result = train("ds_vrwkv_t", str(sample_folder), out=folder / "m.safetensors", epochs=1, device="cpu",
                   progress=progress, config=TrainConfig(patch_size=48, batch_size=2, samples_per_epoch=4,
                                                         num_workers=0))
    assert result.path == rescue / "m.1.safetensors" and str(folder / "m.safetensors") in result.moved
    load_checkpoint(result.path)


def test_the_weights_of_a_run_no_folder_takes_come_back_to_the_caller(sample_folder, tmp_path, places_that_vanish):
    from napari_medrwkv.engine.checkpoint import save_checkpoint
    from napari_medrwkv.engine.train import TrainConfig, WeightsNotSaved, train
    usb, progress = places_that_vanish          # every place the weights could go vanishes while training runs
    with pytest.raises(WeightsNotSaved) as caught:
        train("ds_vrwkv_t", str(sample_folder), out=usb / "m.safetensors", epochs=1, device="cpu", progress=progress,
              config=TrainConfig(patch_size=48, batch_size=2, samples_per_epoch=4, num_workers=0))
    message = str(caught.value)
    assert "nothing was saved" in message and str(usb / "m.safetensors") in message and str(tmp_path / "gone") in message
    assert not usb.exists() and not (tmp_path / "gone").exists()
    model, result = caught.value.model, caught.value.result
    assert len(result.history) == 1
    save_checkpoint(model.net, tmp_path / "later.safetensors", model.info)      # what a caller that lives on does
    assert load_checkpoint(tmp_path / "later.safetensors")[1].training["history"]


def test_too_little_room_for_the_checkpoint_is_refused_before_training(sample_folder, tmp_path, monkeypatch, capsys):
    import shutil
    from collections import namedtuple
    usage = namedtuple("usage", "total used free")
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda where: usage(10 << 30, 10 << 30, 300 << 10)
                        if Path(where).resolve() == tmp_path.resolve() else real(where))
    started = time.monotonic()
    assert main(["train", "--model", "ds_vrwkv_t", "--data", str(sample_folder), *FAST_TRAIN, "--epochs", "50",
                 "--out", str(tmp_path / "m.safetensors")]) == 2
    line = one_line_error(capsys.readouterr().err)
    assert "MiB free" in line and str(tmp_path / "m.safetensors") in line and "free some space" in line
    assert not list(tmp_path.glob("*m.*")) and time.monotonic() - started < 60


# ------------------------------------------------------------------- two writers of one model file

def _record_many(args):
    """In a child process: record ``count`` scores of its own into one checkpoint, one call each."""
    from napari_medrwkv.engine.checkpoint import record_metrics
    path, worker, count, start = args
    while time.time() < start:
        pass
    for i in range(count):
        record_metrics(path, {f"w{worker}_{i}": i})


def _save_many(args):
    """In a child process: save ``count`` new models over one checkpoint; the last one's weights."""
    import torch
    from napari_medrwkv.engine.checkpoint import read_info, save_checkpoint
    from napari_medrwkv.models import create_model
    path, count, start = args
    info = read_info(path)
    net = create_model(info.architecture, num_classes=info.num_classes)
    while time.time() < start:
        pass
    for i in range(count):
        with torch.no_grad():
            next(net.parameters()).fill_(float(i + 1))
        save_checkpoint(net, path, info, overwrite=True)
    return float(next(net.parameters()).flatten()[0])


def test_two_header_updates_at_once_both_land(tmp_path):
    import multiprocessing
    from napari_medrwkv.engine.checkpoint import read_info
    path = Path(untrained_checkpoint(tmp_path / "m.safetensors"))
    with multiprocessing.get_context("fork").Pool(2) as pool:
        start = time.time() + 0.3
        pool.map(_record_many, [(path, 0, 15, start), (path, 1, 15, start)], chunksize=1)
    metrics = read_info(path).metrics
    assert {f"w{w}_{i}" for w in (0, 1) for i in range(15)} <= set(metrics), sorted(metrics)
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]          # and no lock or temporary file


def test_a_header_update_never_writes_back_weights_replaced_meanwhile(tmp_path):
    import multiprocessing
    path = Path(untrained_checkpoint(tmp_path / "m.safetensors"))
    # Spawned, not forked: torch in a child forked from a process whose OpenMP threads ran can hang.
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        start = time.time() + 10
        saving = pool.apply_async(_save_many, [(path, 12, start)])
        pool.apply(_record_many, [(path, 0, 12, start)])
        last = saving.get(timeout=300)
    net, _ = load_checkpoint(path)
    assert float(next(net.parameters()).flatten()[0]) == last == 12


# ------------------------------------------------------------------- interrupts and kills

def test_ctrl_c_during_train_keeps_the_best_weights_so_far(sample_folder, tmp_path):
    ckpt = untrained_checkpoint(tmp_path / "start.safetensors")
    out = tmp_path / "tuned.safetensors"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([*CLI, "train", "--model", ckpt, "--data", str(sample_folder), *FAST_TRAIN[:-2],
                             "--epochs", "10000", "--out", str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, encoding="utf-8", env=env, start_new_session=True)
    try:
        for line in proc.stdout:               # after the first validated epoch, as a user would
            if line.startswith("epoch 1:"):
                break
        os.killpg(proc.pid, signal.SIGINT)     # Ctrl+C reaches every process of the terminal's group
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    said = [line for line in stderr.splitlines() if "saved the best weights so far" in line]
    assert said and str(out) in said[0]
    model, info = load_checkpoint(out)
    assert info.training["cancelled"] is True
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == ["start.safetensors", "tuned.safetensors"]
    assert not list(tmp_path.glob(".*"))


def test_interrupt_while_writing_leaves_no_partial_file(tmp_path):
    target = tmp_path / "m_labels.tif"
    write_labels(target, np.ones((4, 4), np.uint8))
    before = target.read_bytes()
    for stage in ("inside", "after"):
        with pytest.raises(KeyboardInterrupt):
            with atomic_file(target, overwrite=True, suffix=".tif") as tmp:
                Path(tmp).write_bytes(b"half")
                if stage == "inside":
                    raise KeyboardInterrupt
                raise KeyboardInterrupt
    assert target.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["m_labels.tif"]


def test_sigterm_during_segment_leaves_only_complete_files(sample_folder, tmp_path):
    images = tmp_path / "many"
    images.mkdir()
    for i in range(6):
        for name in ("nuclei_fluorescence", "nuclei_brightfield"):
            (images / f"{name}_{i}.png").write_bytes((SAMPLES / f"{name}.png").read_bytes())
    rng = random.Random(0)
    for trial in range(1):
        out = tmp_path / f"out{trial}"
        proc = subprocess.Popen([*CLI, "segment", "--model", "ds_vrwkv_t", "--device", "cpu", "--probabilities",
                                 str(images), "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, encoding="utf-8")
        deadline = time.time() + 120
        while not (out.exists() and any(out.iterdir())) and time.time() < deadline and proc.poll() is None:
            time.sleep(0.01)
        time.sleep(rng.uniform(0, 0.5))
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
        if proc.returncode == 0:
            continue                            # finished before the signal: nothing to check
        assert proc.returncode == 130 and "Traceback" not in stderr and "--skip-existing" in stderr, stderr
        left = sorted(out.iterdir())
        assert left and not [p for p in left if p.name.startswith(".")], left
        for path in left:                       # every file there is whole
            assert read_image(path).shape[:2] == (256, 320) if "bright" in path.name else True
            read_image(path)
        # and a rerun with --skip-existing finishes the job without touching them
        before = hashes(out)
        assert run_cli("segment", "--model", "ds_vrwkv_t", "--device", "cpu", "--probabilities", images,
                       "--out", out, "--skip-existing").returncode == 0
        after = hashes(out)
        assert all(after[k] == v for k, v in before.items()) and len(after) == 2 * 12


# ------------------------------------------------------------------- failed writes

def _unwritable_folder():
    for folder in ("/proc", "/sys"):
        try:
            with tempfile.TemporaryFile(dir=folder):
                pass
        except OSError:
            return Path(folder)
    pytest.skip("no read-only folder on this machine")


def test_out_that_cannot_be_written_is_refused_before_any_work(sample_folder, tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    (tmp_path / "a_folder.safetensors").mkdir()
    ckpt = untrained_checkpoint(tmp_path / "m.safetensors")
    read_only = _unwritable_folder()
    before = hashes(tmp_path)
    cases = []
    for out in (a_file / "m.safetensors", a_file / "sub" / "m.safetensors", tmp_path / "a_folder.safetensors",
                read_only / "m.safetensors"):
        cases.append((["train", "--model", "ds_vrwkv_t", "--data", str(sample_folder), *FAST_TRAIN, "--epochs", "50"],
                      out))
        cases.append((["average", ckpt, ckpt], out))
        cases.append((["calibrate", "--model", ckpt, "--data", str(sample_folder)], out))
    for out in (a_file, a_file / "labels", read_only / "labels"):
        cases.append((["segment", "--model", "ds_vrwkv_t", str(sample_folder / "images")], out))
    for command, out in cases:
        started = time.monotonic()
        code = main([*command, "--out", str(out)])
        captured = capsys.readouterr()
        line = one_line_error(captured.err)
        assert code == 2 and (str(out) in line or str(out.parent) in line), (command, line)
        assert "epoch" not in captured.out and time.monotonic() - started < 30
    assert hashes(tmp_path) == before


def _small_file_limit():
    import resource
    resource.setrlimit(resource.RLIMIT_FSIZE, (2000, 2000))     # like a disk that fills after 2 kB


def test_a_full_disk_is_one_line_and_leaves_no_partial_file(sample_folder, tmp_path):
    out = tmp_path / "labels"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    seg = subprocess.run([*CLI, "segment", "--model", "ds_vrwkv_t", "--probabilities", sample_folder / "images",
                          "--out", out], capture_output=True, text=True, encoding="utf-8", env=env, preexec_fn=_small_file_limit)
    line = one_line_error(seg.stderr)
    assert seg.returncode == 2 and "File too large" in line and str(out) in line
    assert not out.exists() or not [p for p in out.iterdir() if p.name.startswith(".")]
    ckpt = tmp_path / "m.safetensors"
    tr = subprocess.run([*CLI, "train", "--model", "ds_vrwkv_t", "--data", sample_folder, *FAST_TRAIN,
                         "--epochs", "1", "--out", ckpt], capture_output=True, text=True, encoding="utf-8", env=env,
                        preexec_fn=_small_file_limit)
    assert tr.returncode == 2 and "nothing was saved" in one_line_error(tr.stderr), tr.stderr
    assert not ckpt.exists() and not list(tmp_path.glob(".*")) and not list(Path(tempfile.gettempdir()).glob(".m.*"))


# ------------------------------------------------------------------- arguments out of range

BAD_TRAIN_ARGUMENTS = {
    "--epochs": ["0", "-2", "1.5", "x"], "--max-minutes": ["nan", "-1", "0", "inf"], "--lr": ["0", "-1e-3", "nan"],
    "--batch-size": ["0", "-1"], "--patch-size": ["0", "8"], "--samples-per-epoch": ["-1", "0"],
    "--seed": ["-1", "1e3"], "--input-scale": ["0", "5", "nan"], "--foreground": ["-0.1", "2"],
    "--augment-strength": ["-1", "nan"], "--ema": ["1", "-0.5"], "--blend": ["0", "1.5"], "--workers": ["-1"],
    "--in-chans": ["0"], "--num-classes": ["0"],
}
BAD_OTHER_ARGUMENTS = [["segment", "--model", "ds_vrwkv_t", "--out", "OUT", "--tile", "10", "IMAGES"],
                       ["segment", "--model", "ds_vrwkv_t", "--out", "OUT", "--threshold", "1", "IMAGES"],
                       ["segment", "--model", "ds_vrwkv_t", "--out", "OUT", "--threshold", "nan", "IMAGES"],
                       ["evaluate", "--model", "ds_vrwkv_t", "--data", "DATA", "--tile", "-5"],
                       ["calibrate", "--model", "ds_vrwkv_t", "--data", "DATA", "--min-gain", "nan", "--out", "OUT"]]


def test_out_of_range_arguments_are_refused_by_name_before_anything_is_written(sample_folder, tmp_path, capsys):
    before = hashes(sample_folder)
    out = tmp_path / "out"
    cases = [["train", "--model", "ds_vrwkv_t", "--data", str(sample_folder), "--out", str(out / "m.safetensors"),
              argument, value] for argument, values in BAD_TRAIN_ARGUMENTS.items() for value in values]
    cases += [[str(sample_folder / "images") if a == "IMAGES" else str(sample_folder) if a == "DATA"
               else str(out) if a == "OUT" else a for a in case] for case in BAD_OTHER_ARGUMENTS]
    for case in cases:
        with pytest.raises(SystemExit) as exit_:
            main(case)
        line = one_line_error(capsys.readouterr().err)
        argument = next(a for a in case if a in line and a.startswith("--") and a not in ("--model", "--out", "--data"))
        assert exit_.value.code == 2 and f"argument {argument}" in line, (case, line)
    assert hashes(sample_folder) == before and not out.exists()


def test_the_engine_refuses_the_same_ranges(sample_folder):
    from napari_medrwkv.engine.train import TrainConfig, train
    for name, value in (("epochs", 0), ("max_minutes", float("nan")), ("lr", 0.0), ("batch_size", 0),
                        ("samples_per_epoch", -1), ("seed", -1), ("patch_size", 4)):
        epochs = value if name == "epochs" else None
        minutes = value if name == "max_minutes" else None
        config = TrainConfig(**({} if name in ("epochs", "max_minutes") else {name: value}))
        with pytest.raises(ValueError, match=name):
            train("ds_vrwkv_t", str(sample_folder), epochs=epochs, max_minutes=minutes, device="cpu", config=config)


# ------------------------------------------------------------------- a run that diverges

@pytest.mark.parametrize("with_validation", [True, False])
def test_a_diverged_run_stops_with_one_line_and_writes_nothing(sample_folder, tmp_path, with_validation, capsys):
    if not with_validation:            # one pair: no validation data, the loss ranks epochs
        (sample_folder / "images" / "nuclei_brightfield.png").unlink()
        (sample_folder / "masks" / "nuclei_brightfield.png").unlink()
    out = tmp_path / "out"
    out.mkdir()
    code = main(["train", "--model", "ds_vrwkv_t", "--data", str(sample_folder), *FAST_TRAIN, "--epochs", "3",
                 "--lr", "1e30", "--out", str(out / "m.safetensors")])
    line = one_line_error(capsys.readouterr().err)
    assert code == 2 and "diverged" in line and "nothing was saved" in line and "learning rate" in line, line
    assert list(out.iterdir()) == []


# ------------------------------------------------------------------- bad image files

def _bad_images():
    """Files users have: odd shapes, types and values, as PNG and TIFF (name -> array)."""
    rng = np.random.default_rng(0)
    return {
        "two_channels.tif": rng.integers(0, 255, (64, 64, 2), dtype=np.uint8),
        "one_channel.tif": rng.integers(0, 255, (64, 64, 1), dtype=np.uint8),
        "five_channels.tif": rng.integers(0, 255, (40, 48, 5), dtype=np.uint8),
        "complex.tif": (rng.random((32, 32)) + 1j).astype(np.complex64),
        "nan.tif": np.where(rng.random((40, 40)) < 0.5, np.nan, 1.0).astype(np.float32),
        "all_nan.tif": np.full((40, 40), np.nan, np.float32),
        "int32.tif": rng.integers(-2 ** 31, 2 ** 31 - 1, (33, 47), dtype=np.int32),
        "tiny.png": np.zeros((3, 5), np.uint8),
        "line.png": np.full((1, 300), 255, np.uint8),
        "stack.tif": rng.integers(0, 65535, (3, 40, 40), dtype=np.uint16),      # 3 planes, not RGB
        "bool.tif": rng.random((30, 30)) > 0.5,
    }


def test_odd_image_files_are_segmented_right_or_refused_in_one_line(tmp_path, capsys):
    import tifffile
    from PIL import Image
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "truncated.png").write_bytes((SAMPLES / "nuclei_brightfield.png").read_bytes()[:300])
    (folder / "not_an_image.png").write_text("hello")
    os.mkfifo(folder / "fifo.png")
    for name, array in _bad_images().items():
        if name.endswith(".png"):
            Image.fromarray(array).save(folder / name)
        else:
            tifffile.imwrite(folder / name, array, photometric="minisblack")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    for image in sorted(folder.iterdir()):
        before = hashes(tmp_path / "in"), hashes(out)
        code = main(["segment", "--model", "ds_vrwkv_t", "--device", "cpu", str(image), "--out", str(out)])
        captured = capsys.readouterr()
        if code == 0:
            labels = next(out.glob(f"{image.stem}_labels.*"))
            array = read_image(image)
            spatial = array.shape[:-1] if array.ndim >= 3 and array.shape[-1] in (3, 4) else array.shape
            assert read_image(labels).shape == spatial, (image.name, read_image(labels).shape, array.shape)
            labels.unlink()
        else:
            line = one_line_error(captured.err)
            assert code == 2 and str(image) in line or image.name in line, line
        assert (hashes(tmp_path / "in"), hashes(out)) == before, image.name


def test_evaluate_json_is_json_even_with_undefined_scores(tmp_path, capsys):
    data = tmp_path / "data"
    for sub in ("images", "masks"):
        (data / sub).mkdir(parents=True)
    from PIL import Image
    Image.fromarray(np.full((64, 64), 30, np.uint8)).save(data / "images" / "empty.png")
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(data / "masks" / "empty.png")     # HD95 undefined
    assert main(["evaluate", "--model", "ds_vrwkv_t", "--data", str(data), "--json"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    scores = json.loads(last, parse_constant=lambda c: pytest.fail(f"bare {c} in JSON"))
    assert scores["per_image"][0]["name"] == "empty"


def test_overlapping_splits_are_refused_naming_the_file(sample_folder):
    from napari_medrwkv.engine.train import train
    (sample_folder / "splits.json").write_text(json.dumps({"train": ["nuclei_brightfield", "nuclei_fluorescence"],
                                                           "val": ["nuclei_brightfield"]}))
    with pytest.raises(ValueError, match="splits.json") as err:
        train("ds_vrwkv_t", str(sample_folder), split="train", val_split="val", epochs=1, device="cpu")
    assert "nuclei_brightfield" in str(err.value) and "both" in str(err.value)


def test_an_empty_split_is_refused_naming_it_and_the_file(sample_folder, capsys):
    (sample_folder / "splits.json").write_text(json.dumps({"train": [], "val": ["nuclei_brightfield"]}))
    assert main(["train", "--model", "ds_vrwkv_t", "--data", str(sample_folder), "--split", "train",
                 "--out", str(sample_folder / "m.safetensors")]) == 2
    line = one_line_error(capsys.readouterr().err)
    assert "'train' split is empty" in line and str(sample_folder / "splits.json") in line


def _png_header(width: int, height: int) -> bytes:
    """The first bytes of a PNG of that size (a grey 8-bit image): enough for a reader to see its size."""
    import struct
    import zlib
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)) + \
        chunk(b"IDAT", zlib.compress(b"\0" * (width + 1))) + chunk(b"IEND", b"")


def test_a_huge_image_is_called_huge_not_corrupt(tmp_path):
    from napari_medrwkv.engine.imageio import DataError
    huge = tmp_path / "slide.png"
    huge.write_bytes(_png_header(14000, 14000))
    with pytest.raises(DataError) as err:
        read_image(huge)
    assert "larger than Pillow opens" in str(err.value) and "TIFF" in str(err.value) and "corrupt" not in str(err.value)


def test_segment_refuses_arrays_that_are_not_real_numbers():
    from napari_medrwkv.engine.infer import segment
    real = np.random.default_rng(0).random((40, 40))
    for bad in (real + 1j, real.astype(object), np.array([["a"] * 40] * 40)):
        with pytest.raises(ValueError, match="pixel type"):
            segment(bad, model="ds_vrwkv_t", device="cpu")
    assert segment(real, model="ds_vrwkv_t", device="cpu").shape == (40, 40)


def test_an_unreadable_image_mid_batch_says_how_to_finish_and_skip_existing_does(tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    for name in ("a", "c"):
        (images / f"{name}.png").write_bytes((SAMPLES / "nuclei_fluorescence.png").read_bytes())
    (images / "b.png").write_bytes((SAMPLES / "nuclei_fluorescence.png").read_bytes()[:500])     # truncated
    out = tmp_path / "out"
    args = ["segment", "--model", "ds_vrwkv_t", "--device", "cpu", str(images), "--out", str(out)]
    assert main(args) == 2
    line = one_line_error(capsys.readouterr().err)
    assert str(images / "b.png") in line and "1 of 3" in line and "--skip-existing" in line
    done = hashes(out)
    assert list(done) == ["a_labels.png"]
    (images / "b.png").unlink()
    assert main(args + ["--skip-existing"]) == 0
    assert "skipped 1" in capsys.readouterr().out
    after = hashes(out)
    assert sorted(after) == ["a_labels.png", "c_labels.png"] and after["a_labels.png"] == done["a_labels.png"]


def test_training_on_every_pair_with_a_validation_split_is_refused(sample_folder, capsys):
    (sample_folder / "splits.json").write_text(json.dumps({"train": ["nuclei_fluorescence"],
                                                           "val": ["nuclei_brightfield"]}))
    assert main(["train", "--model", "ds_vrwkv_t", "--data", str(sample_folder), "--val-split", "val",
                 "--out", str(sample_folder / "m.safetensors")]) == 2
    line = one_line_error(capsys.readouterr().err)
    assert "--split" in line and "splits.json" in line and not (sample_folder / "m.safetensors").exists()


def test_a_pipe_given_as_a_file_is_refused_not_waited_on(sample_folder, tmp_path, capsys):
    for name in ("model.safetensors", "image.png"):
        os.mkfifo(tmp_path / name)
    for args in (["--model", str(tmp_path / "model.safetensors"), str(sample_folder / "images")],
                 ["--model", "ds_vrwkv_t", str(tmp_path / "image.png")]):
        assert main(["segment", *args, "--out", str(tmp_path / "out")]) == 2
        assert "not a regular file" in one_line_error(capsys.readouterr().err)
    assert not (tmp_path / "out").exists()
