"""Instance models block by block (engine/block_instances.py): the objects of the whole-plane
path, on lazy and zarr inputs, through the command line's scale-out and a Dask cluster."""
import numpy as np
import pytest

zarr = pytest.importorskip("zarr")

import napari_medrwkv as nm  # noqa: E402
from napari_medrwkv.engine.block_instances import narrowed  # noqa: E402
from napari_medrwkv.engine.imageio import read_image  # noqa: E402
from napari_medrwkv.engine.instances import DISTANCE_SEED  # noqa: E402
from napari_medrwkv.engine.model import with_instances  # noqa: E402

from conftest import SAMPLES  # noqa: E402

TILE = 64


@pytest.fixture(scope="module")
def nuclei():
    """DSB2018-like nuclei: the bundled fluorescence sample tiled 2 x 2, cut to an odd size."""
    return np.tile(read_image(SAMPLES / "nuclei_fluorescence.png"), (2, 2, 1))[:300, :340]


@pytest.fixture(scope="module")
def models():
    plain = nm.load_model("rwkv_unet_t-dsb2018", device="cpu")
    return {kind: with_instances(plain, kind) for kind in ("distance", "border")}


def whole_plane(image, model, **kwargs):
    """(labels of the in-memory path, pixels where another path may differ by float rounding)."""
    labels, probs = nm.segment(image, model, tile=TILE, return_probabilities=True, **kwargs)
    return labels, np.abs(probs - 0.5) < 1e-4


def assert_same_objects(got, want, unsure):
    """The same partition of pixels into objects, ids apart: foreground where ``want`` has it, and
    every object of one matching exactly one of the other (pixels in ``unsure`` aside)."""
    got, want = np.asarray(got).astype(np.int64), np.asarray(want).astype(np.int64)
    assert got.shape == want.shape
    sure = ~unsure
    assert unsure.mean() < 0.002
    assert int(((got > 0) != (want > 0))[sure].sum()) == 0
    both = sure & (got > 0)
    pairs = np.unique(np.stack([want[both], got[both]]), axis=1)
    assert pairs.shape[1] == len(np.unique(pairs[0])) == len(np.unique(pairs[1])), "objects split or merged"
    assert len(np.unique(want[want > 0])) == len(np.unique(got[got > 0]))


def crossing_block(labels, block):
    """Block sides at which objects cross block faces and a four-block corner lies inside one."""
    rows, cols = np.arange(block, labels.shape[0], block), np.arange(block, labels.shape[1], block)
    corner = any(len(set(labels[r - 1:r + 1, c - 1:c + 1].ravel()) - {0}) == 1 and
                 labels[r - 1:r + 1, c - 1:c + 1].all() for r in rows for c in cols)
    crossing = sum(len(set(labels[r - 1]) & set(labels[r]) - {0}) for r in rows)
    return corner and crossing >= 3


@pytest.mark.parametrize("kind", ["distance", "border"])
def test_objects_across_block_faces_and_a_four_block_corner_are_the_in_memory_ones(tmp_path, nuclei, models, kind):
    model = models[kind]
    whole, unsure = whole_plane(nuclei, model)
    assert whole.max() > 50 and whole.dtype == np.uint16
    block = next(b for b in range(40, 90, 2) if crossing_block(whole, b))
    lazy = nm.segment(nuclei, model, tile=TILE, block=block, out=tmp_path / "labels.zarr")
    assert isinstance(lazy, zarr.Array) and lazy.dtype == np.uint16 and lazy.chunks == (block, block)
    assert_same_objects(lazy, whole, unsure)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labels.zarr"]      # the temporary store is gone
    # numpy results, and the largest object alone (id 1 in both paths)
    assert_same_objects(nm.segment(nuclei, model, tile=TILE, block=block, out=None), whole, unsure)
    largest = nm.segment(nuclei, model, tile=TILE, block=block, out=None, largest_component=True)
    np.testing.assert_array_equal(largest, nm.segment(nuclei, model, tile=TILE, largest_component=True))


def test_a_stack_on_a_dask_cluster(tmp_path, nuclei, models):
    """Each plane its own objects; a cluster's workers write the probabilities the objects come from."""
    distributed = pytest.importorskip("distributed")
    stack = np.stack([nuclei[:200, :220], nuclei[100:300, 120:340]])
    model = models["distance"]
    whole, probs = nm.segment(stack, model, tile=TILE, return_probabilities=True)
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster, distributed.Client(cluster) as client:
        lazy = nm.segment(stack, model, tile=TILE, block=48, client=client, out=tmp_path / "l.zarr")
    assert lazy.chunks == (1, 48, 48)
    for z in range(2):
        assert_same_objects(lazy[z], whole[z], np.abs(probs[z] - 0.5) < 1e-4)


def test_a_foreground_region_over_the_memory_budget_is_named(tmp_path, nuclei, models, monkeypatch):
    monkeypatch.setenv("MEDRWKV_TILE_MEMORY_MB", "0.02")     # 20 KiB: 320 pixels of a region
    with pytest.raises(MemoryError, match=r"spans \d+ x \d+ pixels .*MEDRWKV_TILE_MEMORY_MB"):
        nm.segment(nuclei, models["distance"], tile=TILE, block=40, out=tmp_path / "labels.zarr")
    assert list(tmp_path.iterdir()) == []                   # nothing half-written left behind


def test_labels_narrow_to_uint16_when_the_objects_fit(tmp_path):
    ids = np.arange(12 * 10, dtype=np.uint32).reshape(12, 10) * 600       # up to 71400: past uint16
    made = tmp_path / ".l.partial"
    array = zarr.open_array(str(made), mode="w-", shape=ids.shape, chunks=(5, 4), dtype=np.uint32)
    array[...] = ids
    kept, path = narrowed(array, int(ids.max()), made)
    assert kept.dtype == np.uint32 and path == made
    small = ids // 600
    array[...] = small
    narrow, path = narrowed(array, int(small.max()), made)
    assert narrow.dtype == np.uint16 and not made.exists() and path.exists()
    np.testing.assert_array_equal(np.asarray(narrow), small)
    assert narrowed(small, 119, None)[0].dtype == np.uint16


def test_medrwkv_segment_writes_instance_ids_to_ome_zarr(tmp_path, nuclei, models):
    pytest.importorskip("ome_zarr")
    from ome_zarr.writer import write_image
    from napari_medrwkv.cli import main
    from napari_medrwkv.engine.checkpoint import save_checkpoint
    from napari_medrwkv.engine.scaleout import read_ome_labels
    model = models["distance"]
    path = tmp_path / "nuclei.safetensors"
    save_checkpoint(model.net, path, model.info, half=False)
    image = nuclei[:200, :220]
    write_image(np.moveaxis(image, -1, 0), zarr.open_group(str(tmp_path / "slide.ome.zarr"), mode="w"), axes="cyx",
                scale_factors=(2,))
    args = ["segment", "--model", str(path), "--tile", str(TILE), "--block", "48", str(tmp_path / "slide.ome.zarr"),
            "--out", str(tmp_path / "out")]
    assert main(args) == 0
    labels = read_ome_labels(tmp_path / "out" / "slide_labels.zarr")
    assert_same_objects(labels, *whole_plane(image, nm.load_model(str(path), device="cpu")))
    assert DISTANCE_SEED > 0.5          # the seeds' threshold is not the foreground's: no pixel sits near both


@pytest.mark.parametrize("kind", ["distance", "border"])
def test_post_processing_by_blocks_equals_the_whole_plane_on_given_probabilities(kind):
    """No network: touching discs everywhere, and pixels that meet only diagonally across a
    four-block corner (both diagonals), post-processed by 16-pixel blocks and whole."""
    from napari_medrwkv.engine.block_instances import plane_instances_by_blocks
    from napari_medrwkv.engine.blocks import _grid
    from napari_medrwkv.engine.instances import object_distance, plane_instances, touching_border
    rng = np.random.default_rng(5)
    truth = np.zeros((70, 90), np.int64)
    yy, xx = np.mgrid[:70, :90]
    for k in range(1, 40):
        cy, cx, r = rng.uniform(0, 70), rng.uniform(0, 90), rng.uniform(3, 8)
        truth[((yy - cy) ** 2 + (xx - cx) ** 2 < r * r) & (truth == 0)] = k
    truth[:, 45:] = 0                                 # the right half: corner cases alone
    for r, c, dr, dc in ((15, 47, 1, 1), (31, 64, 1, -1), (47, 79, 1, 1)):   # 16-px blocks meet at 16k
        truth[r, c], truth[r + dr, c + dc] = 100 + r, 100 + r
    foreground = (truth > 0) * rng.uniform(0.6, 1.0, truth.shape)
    second = object_distance(truth) if kind == "distance" else touching_border(truth) * 0.9
    probs = np.stack([foreground, second]).astype(np.float32)
    whole = plane_instances(probs, kind=kind)
    got = np.zeros(truth.shape, np.uint32)
    count = plane_instances_by_blocks(probs, got, None, list(_grid(truth.shape, 16)), kind, 0.5, False, 1 << 30)
    assert count == whole.max() > 10
    assert_same_objects(got, whole, np.zeros(truth.shape, bool))
    if kind == "border":             # no seeds on one-pixel specks: each diagonal pair is one unseeded object
        assert all(len(np.unique(got[r:r + 2, c:c + 2])) == 2 for r, c in ((15, 47), (31, 63), (47, 79)))


def test_a_second_part_of_the_plane_gets_new_ids(tmp_path, nuclei, models):
    """The Segment widget's part in view, then another: the first part's objects stay, and the
    second's ids follow them (one id, one object, over the whole store)."""
    from napari_medrwkv.engine.blocks import iter_blocks

    def run(rows, cols):
        steps = iter_blocks(nuclei, models["distance"], labels, rows=rows, cols=cols, tile=TILE, block=48)
        for _ in steps:
            pass

    labels = zarr.open_array(str(tmp_path / "l.zarr"), mode="w", shape=nuclei.shape[:2], chunks=(48, 48),
                             dtype=np.uint32)
    run((0, 90), (0, 90))
    first = np.asarray(labels)
    assert first.max() > 5 and not first[96:].any() and not first[:, 96:].any()
    run((200, 290), (200, 330))
    second = np.asarray(labels)
    np.testing.assert_array_equal(second[:96, :96], first[:96, :96])
    new = second[192:, 192:]
    assert new.max() > first.max() + 5 and new[new > 0].min() == first.max() + 1
