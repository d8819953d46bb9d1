"""Images larger than memory: the block-by-block path (engine/blocks.py) against the whole-plane
path, zarr, OME-Zarr, TIFF and Dask inputs, a Dask cluster, and bounded memory."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

zarr = pytest.importorskip("zarr")

import napari_medrwkv as nm  # noqa: E402
from napari_medrwkv.engine.checkpoint import ModelInfo  # noqa: E402
from napari_medrwkv.engine.model import SegmentationModel  # noqa: E402
from napari_medrwkv.engine.preprocess import NORMALIZATION  # noqa: E402
from napari_medrwkv.models import create_model  # noqa: E402

from conftest import SAMPLES, random_image  # noqa: E402

#: A registered architecture made very small, so that tests run many tiles quickly.
TINY = dict(depths=(1, 1, 1, 1), dims=(8, 8, 8, 8), exp_ratios=(1.0, 1.0, 1.0, 1.0), stem_dim=8, decoder_kernel=3)


def tiny_model(num_classes=1, input_scale=1.0, seed=0):
    """Untrained and seeded, its outputs spread so that labels hold objects of both kinds and
    float rounding (1e-7) does not move a pixel across the threshold."""
    torch.manual_seed(seed)
    net = create_model("rwkv_unet_t", num_classes=num_classes, **TINY).eval()
    with torch.no_grad():         # probabilities spread over (0, 1), about half above 0.5
        net.head.weight *= 300
        logits = net(torch.from_numpy(np.random.default_rng(99).normal(0, 1, (1, 3, 64, 64)).astype(np.float32)))
        net.head.bias -= logits.flatten(2).median(-1).values[0]
    info = ModelInfo("rwkv_unet_t", 3, num_classes, arch_kwargs=dict(TINY), normalization=dict(NORMALIZATION),
                     tile_size=64, input_scale=input_scale)
    return SegmentationModel(net, info, "rwkv_unet_t", torch.device("cpu"))


def assert_same(lazy, whole, probs_lazy=None, probs_whole=None, atol=1e-5):
    lazy = np.asarray(lazy)
    assert lazy.shape == whole.shape and lazy.dtype == whole.dtype
    assert 0 < whole.mean() < (whole.max() or 1), "labels of one value test nothing"
    assert int((lazy != whole).sum()) == 0
    if probs_lazy is not None:
        np.testing.assert_allclose(np.asarray(probs_lazy), probs_whole, atol=atol, rtol=0)


@pytest.mark.parametrize("shape,dtype,scale", [((97, 131, 3), np.uint8, 1.0), ((101, 77), np.uint16, 1.0),
                                               ((83, 95), np.float32, 1.0), ((97, 131, 3), np.uint8, 0.5),
                                               ((90, 70, 3), np.uint8, 1.5)])
def test_blocks_equal_the_whole_plane(tmp_path, shape, dtype, scale):
    image = random_image(shape, dtype, seed=1)
    if dtype == np.float32:
        image[3, 5] = np.nan                      # filled with the plane's minimum in both paths
    model = tiny_model(input_scale=scale)
    labels, probs = nm.segment(image, model, tile=64, return_probabilities=True)
    out = nm.segment(image, model, tile=64, block=64, return_probabilities=True,
                     out=(tmp_path / "labels.zarr", tmp_path / "probs.zarr"))
    assert isinstance(out[0], zarr.Array) and out[0].chunks == (64, 64)
    assert_same(out[0], labels)
    np.testing.assert_allclose(np.asarray(out[1]), np.rint(probs * 255), atol=1)
    lazy_labels, lazy_probs = nm.segment(image, model, tile=64, block=64, return_probabilities=True, out=None)
    assert_same(lazy_labels, labels, lazy_probs, probs, atol=1e-5)     # float rounding: tiles may run batched


def test_an_object_across_a_four_block_corner_is_kept_whole(tmp_path):
    """The nuclei model on the bundled sample, blocks meeting inside a nucleus, and the
    largest-object filter, which must join that nucleus's four parts to choose it."""
    from napari_medrwkv.engine.imageio import read_image
    image = read_image(SAMPLES / "nuclei_fluorescence.png")[:200, :220]
    model = nm.load_model("rwkv_unet_t-dsb2018", device="cpu")
    whole = nm.segment(image, model, tile=32, largest_component=True)
    block = next(b for b in range(32, 80) if _corner_inside(whole, b))
    lazy = nm.segment(image, model, tile=32, block=block, largest_component=True, out=tmp_path / "l.zarr")
    assert_same(lazy, whole)
    # Without the filter too: every object, cut nowhere.
    assert_same(nm.segment(image, model, tile=32, block=block, out=None), nm.segment(image, model, tile=32))


def _corner_inside(labels, block):
    """Whether four blocks of side ``block`` meet at a pixel whose 2x2 neighbourhood is all foreground."""
    rows, cols = np.arange(block, labels.shape[0], block), np.arange(block, labels.shape[1], block)
    return any(labels[r - 1:r + 1, c - 1:c + 1].all() for r in rows for c in cols)


def test_a_multiclass_stack_into_zarr(tmp_path):
    image = random_image((3, 75, 61), np.uint16, seed=2)
    model = tiny_model(num_classes=3)
    labels, probs = nm.segment(image, model, tile=48, return_probabilities=True)
    assert probs.shape == (3, 3, 75, 61)
    zl, zp = nm.segment(image, model, tile=48, block=32, return_probabilities=True,
                        out=(str(tmp_path / "l.zarr"), str(tmp_path / "p.zarr")))
    assert zl.chunks == (1, 32, 32) and zp.chunks == (1, 1, 32, 32) and zp.dtype == np.uint8
    assert_same(zl, labels)
    np.testing.assert_allclose(np.asarray(zp), np.rint(probs * 255), atol=1)


def test_lazy_inputs_of_every_kind(tmp_path):
    """numpy, a memory map, zarr and Dask arrays, an OME-Zarr store and a tiled TIFF: one result."""
    import dask.array as da
    import tifffile
    from ome_zarr.writer import write_image
    image = random_image((150, 130, 3), seed=3)
    model = tiny_model()
    whole = nm.segment(image, model, tile=64)
    memmap = np.lib.format.open_memmap(tmp_path / "m.npy", mode="w+", dtype=image.dtype, shape=image.shape)
    memmap[...] = image
    stored = zarr.open_array(str(tmp_path / "a.zarr"), mode="w", shape=image.shape, chunks=(50, 50, 3),
                             dtype=image.dtype)
    stored[...] = image
    tifffile.imwrite(tmp_path / "t.tif", image, tile=(64, 64))
    group = zarr.open_group(str(tmp_path / "ome.zarr"), mode="w")
    write_image(np.moveaxis(image, -1, 0), group, axes="cyx", scale_factors=(2,))
    for source in (memmap, stored, da.from_array(image, chunks=(40, 70, 3)), tmp_path / "a.zarr",
                   str(tmp_path / "t.tif"), tmp_path / "ome.zarr"):
        assert_same(nm.segment(source, model, tile=64, block=48), whole)


def test_a_local_dask_cluster_gives_the_single_process_labels(tmp_path):
    distributed = pytest.importorskip("distributed")
    image = random_image((140, 150, 3), seed=4)
    model = tiny_model()
    single = nm.segment(image, model, tile=64, block=48, out=tmp_path / "one.zarr")
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None)
    with cluster, distributed.Client(cluster) as client:
        stored = zarr.open_array(str(tmp_path / "in.zarr"), mode="w", shape=image.shape, chunks=(48, 48, 3),
                                 dtype=image.dtype)
        stored[...] = image
        spread = nm.segment(tmp_path / "in.zarr", model, tile=64, block=48, client=client, out=tmp_path / "two.zarr")
        workers = client.run(lambda: os.getpid())
    assert len(set(workers.values())) == 2
    assert_same(spread, np.asarray(single))


def test_existing_targets_and_missing_stores_are_refused(tmp_path):
    model = tiny_model()
    image = random_image((40, 40), seed=5)
    (tmp_path / "labels.zarr").mkdir()
    with pytest.raises(FileExistsError, match="labels.zarr exists"):
        nm.segment(image, model, out=tmp_path / "labels.zarr")
    with pytest.raises(ValueError, match="missing.zarr does not exist"):
        nm.segment(tmp_path / "missing.zarr", model)
    with pytest.raises(ValueError, match="pair"):
        nm.segment(image, model, out=tmp_path / "x.zarr", return_probabilities=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labels.zarr"]


def test_an_unsupported_layout_is_refused_by_name(tmp_path):
    from ome_zarr.writer import write_image
    group = zarr.open_group(str(tmp_path / "two_channels.zarr"), mode="w")
    write_image(random_image((2, 40, 40), seed=6), group, axes="cyx", scale_factors=())
    with pytest.raises(ValueError, match="two_channels.zarr has axes cyx of sizes"):
        nm.segment(tmp_path / "two_channels.zarr", tiny_model())
    stored = zarr.open_array(str(tmp_path / "five.zarr"), mode="w", shape=(2, 30, 30, 5), dtype=np.uint8)
    with pytest.raises(ValueError, match="shape"):
        nm.segment(stored, tiny_model())
    chunked = zarr.open_array(str(tmp_path / "c.zarr"), mode="w", shape=(64, 64), chunks=(24, 24), dtype=np.uint8)
    with pytest.raises(ValueError, match="do not divide"):
        nm.segment(random_image((64, 64)), tiny_model(), block=32, out=chunked)


_MEMORY_SCRIPT = r"""
import resource, sys, numpy as np, zarr, torch
sys.path.insert(0, sys.argv[2])
from test_blocks import tiny_model
import napari_medrwkv as nm
from napari_medrwkv.engine.memory import retain_freed_memory
retain_freed_memory()              # as load_model and the command line do: one malloc arena for all threads
model = tiny_model(input_scale=0.25)
# Warm: the network, zarr's codecs and threads, on a 2048 x 2048 image through the same path.
small = zarr.open_array(sys.argv[1] + "-small.zarr", mode="w", shape=(2048, 2048), chunks=(1024, 1024), dtype=np.uint8)
small[...] = np.random.default_rng(0).integers(0, 255, (2048, 2048), dtype=np.uint8)
nm.segment(small, model, tile=128, block=1024, out=sys.argv[1] + "-small-labels.zarr")
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
labels = nm.segment(sys.argv[1], model, tile=128, block=1024, out=sys.argv[1] + "-labels.zarr")
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(before, peak, int(np.asarray(labels[::64, ::64]).sum()))
"""


def _clean_environment():
    # A LocalCluster started earlier in this process leaves MALLOC_TRIM_THRESHOLD_ (and its own
    # markers) in os.environ for its workers: malloc settings a user's shell would not have.
    kept = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "__DASK"))}
    return {**kept, "OMP_NUM_THREADS": "1"}


def test_peak_memory_on_a_large_zarr_image_is_bounded(tmp_path):
    """8192 x 8192 pixels: one float32 plane is 256 MiB (the whole-plane path holds five: three
    channels, probabilities and weights); the block path's peak grows by less than one from
    that of a 2048 x 2048 image."""
    side = 8192
    store = zarr.open_array(str(tmp_path / "big.zarr"), mode="w", shape=(side, side), chunks=(1024, 1024),
                            dtype=np.uint8)
    rng = np.random.default_rng(7)
    for r in range(0, side, 1024):
        store[r:r + 1024] = rng.integers(0, 255, (1024, side), dtype=np.uint8)
    run = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, str(tmp_path / "big.zarr"), os.path.dirname(__file__)],
                         capture_output=True, text=True, encoding="utf-8", timeout=600, env=_clean_environment())
    assert run.returncode == 0, run.stderr[-2000:]
    before, peak, found = map(int, run.stdout.split()[-3:])
    plane = side * side * 4
    assert peak - before < plane, f"peak {peak >> 20} MiB, {before >> 20} MiB after a 2048 x 2048 image"
    assert zarr.open_array(str(tmp_path / "big.zarr-labels.zarr"), mode="r").shape == (side, side)


def test_cancel_stops_between_tiles_and_leaves_no_store(tmp_path):
    from napari_medrwkv.engine.infer import Cancelled
    image = random_image((100, 100), seed=8)
    seen = []
    with pytest.raises(Cancelled):
        nm.segment(image, tiny_model(), tile=32, block=32, out=tmp_path / "labels.zarr",
                   progress=lambda done, total: seen.append((done, total)), cancel=lambda: len(seen) >= 3)
    assert seen[-1][0] == 3 and seen[-1][1] > 3
    assert list(tmp_path.iterdir()) == []


def test_iter_blocks_runs_only_the_blocks_asked_for_into_the_full_store(tmp_path):
    """One task at a time (the Segment widget's path): the blocks meeting the asked rows, columns
    and planes hold what a run over the whole image writes there, the rest stays 0; the
    largest-object filter runs only on planes segmented whole."""
    from napari_medrwkv.engine.blocks import iter_blocks
    image = random_image((3, 150, 170), seed=9)
    model = tiny_model()
    whole = nm.segment(image, model, tile=48, block=48, out=None)
    store = zarr.open_array(str(tmp_path / "l.zarr"), mode="w", shape=image.shape, chunks=(1, 48, 48), dtype=np.uint8)
    steps = list(iter_blocks(image, model, store, planes=[1], rows=(50, 60), cols=(100, 150), tile=48, block=48))
    assert [s[:2] for s in steps] == [(1, 2), (2, 2)]              # rows 48-96 x columns 96-144 and 144-170
    assert {(z, r.start, c.start) for _, _, (z, r, c) in steps} == {(1, 48, 96), (1, 48, 144)}
    got = np.asarray(store)
    asked = (1, slice(48, 96), slice(96, 170))
    assert_same(got[asked], whole[asked])
    got[asked] = 0
    assert not got.any()
    # A whole plane, with the largest-object filter: that plane alone is filtered.
    largest = nm.segment(image, model, tile=48, block=48, out=None, largest_component=True)
    list(iter_blocks(image, model, store, planes=[2], tile=48, block=48, largest_component=True))
    assert_same(store[2], largest[2])
    assert not store[0].any()


def test_iter_blocks_cancelled_keeps_the_blocks_written_before(tmp_path):
    from napari_medrwkv.engine.blocks import iter_blocks
    from napari_medrwkv.engine.infer import Cancelled
    image = random_image((100, 100), seed=10)
    model = tiny_model()
    whole = nm.segment(image, model, tile=32, block=32, out=None)
    store = zarr.open_array(str(tmp_path / "l.zarr"), mode="w", shape=image.shape, chunks=(32, 32), dtype=np.uint8)
    done = []
    with pytest.raises(Cancelled):
        for step in iter_blocks(image, model, store, tile=32, block=32, cancel=lambda: len(done) >= 3):
            done.append(step)
    got = np.asarray(store)
    for _, _, (_, rows, cols) in done:
        assert_same(got[rows, cols], whole[rows, cols])
        got[rows, cols] = 0
    assert len(done) == 3 and not got.any()
    assert (tmp_path / "l.zarr").is_dir()                          # an open array is the caller's: kept
