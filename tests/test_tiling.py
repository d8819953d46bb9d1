"""The tiling policy (engine/tiling.py) against brute force, and segmenting with it."""
import itertools

import numpy as np
import pytest

from napari_medrwkv.engine import tiling
from napari_medrwkv.engine.infer import segment, tile_starts
from napari_medrwkv.engine.tiling import axis_tiles, plan_tiles


def covered_with_overlap(size, tile, starts, overlap):
    """Every pixel covered; each neighbour pair overlapping by at least ``overlap`` (brute force)."""
    hits = np.zeros(size, int)
    for start in starts:
        assert 0 <= start and start + tile <= size
        hits[start:start + tile] += 1
    gaps_ok = all(a + tile - b >= min(overlap, tile) for a, b in zip(starts, starts[1:]))
    return bool(hits.min() >= 1) and gaps_ok


@pytest.mark.parametrize("size,count,overlap", [(1000, 3, 64), (1001, 2, 64), (97, 5, 16), (4096, 7, 64),
                                                (33, 2, 0), (640, 4, 200), (5000, 1, 64)])
def test_axis_tiles_cover_overlap_and_no_smaller_tile_does(size, count, overlap):
    tile, starts = axis_tiles(size, count, overlap)
    assert len(starts) == count and covered_with_overlap(size, tile, starts, overlap)
    if count > 1:                         # one pixel less and the same count cannot cover with that overlap
        assert tile == size or not covered_with_overlap(size, tile - 1,
                                                        [round(i * (size - tile + 1) / (count - 1))
                                                         for i in range(count)], overlap)


def brute_force_fewest_pixels(shape, max_pixels, overlap, max_side=10**9):
    """The least total pixels over every (ny, nx) whose evenly spread tiles fit ``max_pixels``."""
    best = None
    for ny, nx in itertools.product(range(1, 40), range(1, 40)):
        th, _ = axis_tiles(shape[0], ny, overlap)
        tw, _ = axis_tiles(shape[1], nx, overlap)
        if th * tw <= max_pixels and max(th, tw) <= max_side:
            total = ny * nx * th * tw
            best = total if best is None else min(best, total)
    return best


@pytest.mark.parametrize("shape,budget_tiles", [((4096, 4096), 2048), ((3000, 4000), 2048), ((1500, 700), 512),
                                                ((2049, 2049), 2048), ((5000, 333), 1024), ((999, 1777), 700)])
def test_the_plan_runs_the_fewest_pixels_any_tiling_could(shape, budget_tiles):
    per_pixel = tiling.bytes_per_pixel("rwkv_unet_t")
    budget = budget_tiles * budget_tiles * per_pixel
    plan = plan_tiles(shape, "rwkv_unet_t", memory_budget_bytes=budget, device="cuda")
    th, tw = plan.tile
    assert th * tw * per_pixel <= budget                                   # each tile within the budget
    assert covered_with_overlap(shape[0], th, plan.ys, plan.overlap)
    assert covered_with_overlap(shape[1], tw, plan.xs, plan.overlap)
    assert plan.pixels == brute_force_fewest_pixels(shape, budget // per_pixel, plan.overlap)
    on_cpu = plan_tiles(shape, "rwkv_unet_t", memory_budget_bytes=budget)       # and a CPU's speed limit
    assert on_cpu.pixels == brute_force_fewest_pixels(shape, min(budget // per_pixel, tiling.CPU_TILE_PIXELS),
                                                      on_cpu.overlap, tiling.CPU_TILE_SIDE)
    assert plan.reason.startswith("auto:") and f"{th}×{tw}" in plan.reason


def test_a_plane_that_fits_runs_whole_and_a_chosen_tile_tiles_as_before():
    plan = plan_tiles((1024, 768), "rwkv_unet_t", memory_budget_bytes=4 << 30)
    assert plan.count == 1 and plan.tile == (1024, 768) and "one pass" in plan.reason
    for size, tile in [(1024, 512), (1000, 256), (300, 512), (777, 100)]:
        plan = plan_tiles((size, size + 5), "rwkv_unet_t", tile=tile)
        assert list(plan.ys) == tile_starts(size, tile, tile // 4) and list(plan.xs) == tile_starts(size + 5, tile,
                                                                                                    tile // 4)


def test_the_budget_comes_from_the_argument_the_environment_or_the_machine(monkeypatch):
    monkeypatch.setenv(tiling.BUDGET_ENV, "64")
    small = plan_tiles((2048, 2048), "rwkv_unet_t")
    assert small.count > 1 and small.tile[0] * small.tile[1] * tiling.bytes_per_pixel("rwkv_unet_t") <= 64 << 20
    assert plan_tiles((2048, 2048), "rwkv_unet_t", memory_budget_bytes=16 << 30, device="cuda").count == 1
    monkeypatch.setenv(tiling.BUDGET_ENV, "lots")
    with pytest.raises(ValueError, match=tiling.BUDGET_ENV):
        plan_tiles((2048, 2048), "rwkv_unet_t")
    monkeypatch.delenv(tiling.BUDGET_ENV)
    assert tiling.memory_budget() > 0
    on_cpu = plan_tiles((2048, 2048), "rwkv_unet_t", memory_budget_bytes=16 << 30, device="cpu")
    assert on_cpu.count > 1 and on_cpu.tile[0] * on_cpu.tile[1] <= tiling.CPU_TILE_PIXELS
    assert max(on_cpu.tile) <= tiling.CPU_TILE_SIDE and "on a CPU" in on_cpu.reason


def test_segmenting_tiled_by_the_budget_agrees_with_one_pass(monkeypatch):
    # A small budget forces the policy's tiles; they must agree with the whole-plane pass
    # (the reference) on nearly every pixel.
    import torch
    from napari_medrwkv.engine.model import load_model
    torch.manual_seed(0)
    model = load_model("rwkv_unet_t-dsb2018", device="cpu")
    from conftest import SAMPLES
    from napari_medrwkv.engine.imageio import read_image
    image = np.tile(read_image(SAMPLES / "nuclei_fluorescence.png"), (2, 2) + (1,) * (read_image(
        SAMPLES / "nuclei_fluorescence.png").ndim - 2))
    whole = segment(image, model=model, tile=max(image.shape[:2]))
    monkeypatch.setenv(tiling.BUDGET_ENV, str(300 * 300 * tiling.bytes_per_pixel("rwkv_unet_t") / 2**20))
    plan = plan_tiles(image.shape[:2], "rwkv_unet_t")
    assert plan.count > 1
    tiled = segment(image, model=model)
    assert np.mean(tiled == whole) >= 0.999


@pytest.mark.parametrize("shape,tile", [((3, 97, 131), None), ((200, 170), 64), ((2, 150, 90, 3), 64)])
def test_batched_tiles_and_planes_give_what_one_at_a_time_gives(monkeypatch, shape, tile):
    # A GPU batches tiles (and the planes of a stack); the CPU path runs one at a time.  Forcing
    # batches of three on the CPU must change nothing but the float rounding of the convolutions.
    import torch
    from napari_medrwkv.engine import infer
    from napari_medrwkv.engine.model import load_model
    torch.manual_seed(0)
    model = load_model("ds_vrwkv_t", device="cpu")
    image = np.random.default_rng(1).integers(0, 255, shape).astype(np.uint8)
    rgb = len(shape) == 4 or None
    ticks = []
    one_labels, one_probs = segment(image, model=model, tile=tile, return_probabilities=True, rgb=rgb,
                                    progress=lambda d, t: ticks.append((d, t)))
    monkeypatch.setattr(infer, "batch_size", lambda *args, **kwargs: 3)
    batched_ticks = []
    labels, probs = segment(image, model=model, tile=tile, return_probabilities=True, rgb=rgb,
                            progress=lambda d, t: batched_ticks.append((d, t)))
    np.testing.assert_allclose(probs, one_probs, atol=1e-4)
    assert np.mean(labels == one_labels) >= 0.999
    assert batched_ticks == ticks                               # progress still counts every tile


def test_a_cpu_batches_only_small_tiles_and_a_gpu_as_many_as_fit():
    import torch
    plan = plan_tiles((1024, 1024), "rwkv_unet_t", memory_budget_bytes=1 << 40)
    assert tiling.batch_size(plan, "rwkv_unet_t", torch.device("cpu")) == 1
    assert tiling.batch_size(plan_tiles((256, 256), "rwkv_unet_t"), "rwkv_unet_t", torch.device("cpu")) == 4
    per_tile = 1024 * 1024 * tiling.bytes_per_pixel("rwkv_unet_t")
    assert tiling.batch_size(plan, "rwkv_unet_t", torch.device("cuda"), memory_budget_bytes=3 * per_tile) == 3
    assert tiling.batch_size(plan, "rwkv_unet_t", torch.device("cuda"), memory_budget_bytes=1) == 1
    assert tiling.batch_size(plan, "rwkv_unet_t", torch.device("cuda"), memory_budget_bytes=1 << 50) == \
        tiling.MAX_GPU_BATCH
