"""medrwkv segment on zarr stores, large TIFFs and Dask: OME-Zarr labels, workers, resume, and
a scheduler that does not answer."""
import time

import numpy as np
import pytest

zarr = pytest.importorskip("zarr")
pytest.importorskip("ome_zarr")

import napari_medrwkv as nm  # noqa: E402
from napari_medrwkv.cli import main  # noqa: E402
from napari_medrwkv.engine import scaleout  # noqa: E402
from napari_medrwkv.engine.checkpoint import save_checkpoint  # noqa: E402
from napari_medrwkv.engine.imageio import read_image  # noqa: E402

from conftest import random_image  # noqa: E402
from test_blocks import tiny_model  # noqa: E402


@pytest.fixture
def tiny_checkpoint(tmp_path):
    model = tiny_model()
    path = tmp_path / "tiny.safetensors"
    save_checkpoint(model.net, path, model.info)
    return path


def _ome_image(path, image):
    from ome_zarr.writer import write_image
    write_image(np.moveaxis(image, -1, 0), zarr.open_group(str(path), mode="w"), axes="cyx", scale_factors=(2,))


def _ome_labels(store):
    """Full-resolution labels read back by ome-zarr-py's own reader."""
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader
    nodes = [n for n in Reader(parse_url(str(store / "labels")))() if n.data]
    assert len(nodes) == 1
    return np.asarray(nodes[0].data[0])


def test_zarr_and_large_tiff_inputs_give_ome_zarr_labels_and_resume_skips_them(tmp_path, tiny_checkpoint,
                                                                                monkeypatch, capsys):
    import tifffile
    monkeypatch.setattr(scaleout, "LARGE_TIFF_PIXELS", 100 * 100)      # "large" from 100 x 100 up
    big, small = random_image((130, 150, 3), seed=1), random_image((60, 70, 3), seed=2)
    _ome_image(tmp_path / "slide.ome.zarr", big)
    tifffile.imwrite(tmp_path / "scan.tif", big[::-1], tile=(64, 64))
    tifffile.imwrite(tmp_path / "small.tif", small)
    out = tmp_path / "out"
    args = ["segment", "--model", str(tiny_checkpoint), "--tile", "64", "--block", "48",
            str(tmp_path / "slide.ome.zarr"), str(tmp_path / "scan.tif"), str(tmp_path / "small.tif"), "--out", str(out)]
    assert main(args) == 0
    model = nm.load_model(str(tiny_checkpoint), device="cpu")
    assert sorted(p.name for p in out.iterdir()) == ["scan_labels.zarr", "slide_labels.zarr", "small_labels.tif"]
    np.testing.assert_array_equal(_ome_labels(out / "slide_labels.zarr"), nm.segment(big, model, tile=64))
    np.testing.assert_array_equal(_ome_labels(out / "scan_labels.zarr"), nm.segment(big[::-1], model, tile=64))
    np.testing.assert_array_equal(read_image(out / "small_labels.tif"), nm.segment(small, model, tile=64))
    assert zarr.open_group(str(out / "slide_labels.zarr"))["labels/tiny/0"].chunks == (48, 48)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    assert main(args) != 0 and "exists" in capsys.readouterr().err
    assert main(args + ["--resume"]) == 0 and "skipped 3" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before


def test_two_local_dask_workers_write_what_one_process_writes(tmp_path, tiny_checkpoint):
    big = random_image((120, 110, 3), seed=3)
    _ome_image(tmp_path / "slide.zarr", big)
    for i in range(3):
        import tifffile
        tifffile.imwrite(tmp_path / f"im{i}.tif", random_image((50 + i, 60, 3), seed=10 + i))
    inputs = [str(tmp_path / "slide.zarr")] + [str(tmp_path / f"im{i}.tif") for i in range(3)]
    common = ["segment", "--model", str(tiny_checkpoint), "--tile", "64", "--block", "48"] + inputs
    assert main(common + ["--out", str(tmp_path / "one")]) == 0
    assert main(common + ["--out", str(tmp_path / "two"), "--workers", "2"]) == 0
    np.testing.assert_array_equal(_ome_labels(tmp_path / "two" / "slide_labels.zarr"),
                                  _ome_labels(tmp_path / "one" / "slide_labels.zarr"))
    for i in range(3):
        np.testing.assert_array_equal(read_image(tmp_path / "two" / f"im{i}_labels.tif"),
                                      read_image(tmp_path / "one" / f"im{i}_labels.tif"))


def test_a_scheduler_that_does_not_answer_is_said_within_seconds_and_nothing_is_written(tmp_path, tiny_checkpoint,
                                                                                       capsys):
    import tifffile
    tifffile.imwrite(tmp_path / "a.tif", random_image((40, 40), seed=4))
    start = time.monotonic()
    status = main(["segment", "--model", str(tiny_checkpoint), str(tmp_path / "a.tif"), "--out", str(tmp_path / "out"),
                   "--scheduler", "tcp://127.0.0.1:9"])
    assert time.monotonic() - start < 20
    err = capsys.readouterr().err
    assert status != 0 and "no Dask scheduler answered at tcp://127.0.0.1:9" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()
    assert main(["segment", "--model", str(tiny_checkpoint), str(tmp_path / "a.tif"), "--out", str(tmp_path / "out"),
                 "--scheduler-file", str(tmp_path / "none.json")]) != 0
    assert "--scheduler-file" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_a_missing_store_is_named(tmp_path, tiny_checkpoint, capsys):
    assert main(["segment", "--model", str(tiny_checkpoint), str(tmp_path / "gone.zarr"), "--out",
                 str(tmp_path / "out")]) != 0
    assert "gone.zarr does not exist" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_local_cluster_leaves_the_callers_environment_as_it_was(monkeypatch):
    """Dask's nannies set one-thread and malloc variables for their workers in the spawning
    process's environment; the workers keep them, the caller gets its own back."""
    import os
    for key in ("MALLOC_TRIM_THRESHOLD_", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        monkeypatch.delenv(key, raising=False)
    before = dict(os.environ)
    client = scaleout.connect(workers=1)
    try:
        assert dict(os.environ) == before
        worker_env = next(iter(client.run(lambda: dict(os.environ)).values()))
        assert worker_env["OMP_NUM_THREADS"] == "1" and "MALLOC_TRIM_THRESHOLD_" in worker_env
    finally:
        client.close()
        client.cluster.close()
    assert dict(os.environ) == before


def test_probing_zarr_stores_and_plain_folders_for_a_scan_prints_nothing(tmp_path, capfd):
    """segment and medrwkv segment ask whether a path is a scan before reading it as zarr: the
    answer is no, and ITK's "No Series were found" must not reach the user's terminal."""
    pytest.importorskip("SimpleITK")
    from napari_medrwkv.engine.scans import is_scan
    for fmt in (2, 3):
        zarr.open_array(str(tmp_path / f"v{fmt}.zarr"), mode="w", shape=(64, 64), chunks=(32, 32), dtype=np.uint8,
                        zarr_format=fmt)[...] = 1
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "notes").write_text("not an image")
    assert not any(is_scan(tmp_path / name) for name in ("v2.zarr", "v3.zarr", "plain"))
    err = capfd.readouterr().err
    assert "No Series" not in err and "WARNING" not in err
