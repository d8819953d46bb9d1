"""Where the tiles of a plane go: the largest tiles the memory budget allows (on a CPU, up to
the size past which a pass slows down), placed to cover the plane with the fewest pixels,
overlapping by what the network needs at a tile's border.

A plane that fits runs whole, in one pass: the Bi-WKV mixes the whole input, so one pass runs no
pixel twice and is the reference every tiling is compared with. A larger plane is cut into
``ny`` x ``nx`` tiles, each of at most the budget's pixels; among the counts that fit,
:func:`plan_tiles` takes the one that runs the fewest pixels in all, and each tile is no larger
than it needs to be for that count.

The numbers behind the policy are measured per architecture and kept here as data
(``python bench/tile_policy.py --memory --margin`` prints them; ``bench/RESULTS.md``, "Tiles").
"""
import math
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

#: Peak memory of one forward pass, bytes per input pixel, measured on the CPU (float32, one
#: image, the fused inference network; the largest of 256², 512² and 1024²); flips run one
#: after another and need no more.
BYTES_PER_PIXEL: Dict[str, int] = {"rwkv_unet_t": 1200, "med_urwkv_t": 690, "ds_vrwkv_t": 340}
#: For an architecture not measured: the largest above, with room to spare.
UNKNOWN_BYTES_PER_PIXEL = 1700
#: How far in from a tile's border its labels still differ from a whole-plane pass (network
#: pixels): the overlap tiles need, so that each pixel is taken mostly from a tile that sees
#: that far around it.
BORDER_MARGIN: Dict[str, int] = {"rwkv_unet_t": 64}
UNKNOWN_BORDER_MARGIN = 128
#: The share of the memory the system says is available that one forward pass may take.
BUDGET_SHARE = 0.25
#: The budget when the system does not say (bytes).
FALLBACK_BUDGET = 2 << 30
#: The environment variable that sets the budget, in MiB (the ``memory_budget`` argument wins).
BUDGET_ENV = "MEDRWKV_TILE_MEMORY_MB"
#: On a CPU, the largest tile (pixels): past about 1280² a pass runs fewer pixels per second
#: (its activations no longer fit the caches: ``rwkv_unet_t`` on 2 threads ran 1.2-1.27 MP/s
#: from 512² to 1280², 1.13 at 1536² and 0.83 at 2048²), so larger planes run faster in tiles.
#: A GPU takes the largest tile its memory holds.
CPU_TILE_PIXELS = 1280 * 1280
#: ... and the longest tile side on a CPU: long thin tiles ran slower per pixel (three of 2048×726
#: for a 2048² plane: 0.76x the 512² rate, four of 1056²: 0.96x).
CPU_TILE_SIDE = 1280
#: Tiles are never smaller than this (network pixels): the networks halve the input five times.
MIN_TILE = 32


@dataclass(frozen=True)
class TilePlan:
    """The tiles of one plane, in network pixels: tile shape, start offsets along each axis, and
    in words why this shape (for the Tile control and ``medrwkv segment``)."""

    tile: Tuple[int, int]
    ys: Tuple[int, ...]
    xs: Tuple[int, ...]
    overlap: int
    reason: str

    @property
    def count(self) -> int:
        return len(self.ys) * len(self.xs)

    @property
    def pixels(self) -> int:
        """Pixels the network runs for this plane (overlaps counted twice)."""
        return self.count * self.tile[0] * self.tile[1]


def bytes_per_pixel(architecture: str) -> int:
    return BYTES_PER_PIXEL.get(architecture, UNKNOWN_BYTES_PER_PIXEL)


def border_margin(architecture: str) -> int:
    return BORDER_MARGIN.get(architecture, UNKNOWN_BORDER_MARGIN)


def memory_budget(device=None, budget: Optional[int] = None) -> int:
    """Bytes one forward pass may take: ``budget`` if given, else ``$MEDRWKV_TILE_MEMORY_MB``,
    else a share of what the device has free (a CUDA GPU's free memory, or the memory the
    system says is available)."""
    if budget is not None:
        if budget <= 0:
            raise ValueError(f"memory_budget={budget}: give a number of bytes above 0")
        return int(budget)
    text = os.environ.get(BUDGET_ENV, "").strip()
    if text:
        try:
            megabytes = float(text)
        except ValueError:
            megabytes = -1
        if not megabytes > 0:
            raise ValueError(f"{BUDGET_ENV}={text!r}: give the memory one tile may take in MiB, e.g. 2048")
        return int(megabytes * 2**20)
    return int(BUDGET_SHARE * _free_bytes(device))


def _free_bytes(device) -> int:
    if _is_gpu(device):
        import torch
        free, _ = torch.cuda.mem_get_info(device)
        return free
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return FALLBACK_BUDGET


def axis_tiles(size: int, count: int, overlap: int) -> Tuple[int, List[int]]:
    """The smallest tile length for ``count`` tiles along an axis of ``size`` pixels that
    overlap by at least ``overlap``, and their starts, spread evenly from 0 to the end."""
    if count <= 1:
        return size, [0]
    tile = min(size, -(-(size + (count - 1) * overlap) // count))
    while True:       # rounding the starts can shave a pixel off an overlap: grow until none is short
        starts = [round(i * (size - tile) / (count - 1)) for i in range(count)]
        if all(b - a <= tile - min(overlap, tile) for a, b in zip(starts, starts[1:])):
            return tile, starts
        tile += 1


def tile_starts(size: int, tile: int, overlap: int) -> List[int]:
    """Start offsets covering [0, size) with tiles of ``tile`` overlapping by at least ``overlap``
    (a tile the user chose: full-size tiles spread evenly, or one when the axis is shorter)."""
    if size <= tile:
        return [0]
    count = _counts(size, overlap, tile)
    return [round(i * (size - tile) / (count - 1)) for i in range(count)]


def _counts(size: int, overlap: int, max_tile: int) -> int:
    """The fewest tiles of at most ``max_tile`` that cover ``size`` overlapping by ``overlap``."""
    if size <= max_tile:
        return 1
    return -(-(size - overlap) // (max_tile - overlap))


def plan_tiles(shape: Tuple[int, int], architecture: str, tile: Optional[int] = None, device=None,
               memory_budget_bytes: Optional[int] = None) -> TilePlan:
    """The tiles for a plane of ``shape`` (network pixels) on ``device`` (None: a CPU).

    ``tile`` (the user's choice): square tiles of at most that side, overlapping by a quarter,
    as ever.  Otherwise the policy: the plane whole when its pass fits the memory budget (and,
    on a CPU, :data:`CPU_TILE_PIXELS`), else the tiling with the fewest pixels in all whose
    tiles each fit it, overlapping by the architecture's :data:`BORDER_MARGIN`."""
    height, width = int(shape[0]), int(shape[1])
    if tile is not None:
        tile = int(tile)
        overlap = tile // 4
        ys, xs = tile_starts(height, tile, overlap), tile_starts(width, tile, overlap)
        return TilePlan((min(tile, height), min(tile, width)), tuple(ys), tuple(xs), overlap, f"{tile} px (chosen)")
    budget = memory_budget(device, memory_budget_bytes)
    max_pixels = max(budget // bytes_per_pixel(architecture), MIN_TILE * MIN_TILE)
    budget_words = f"{budget / 2**20:.0f} MiB for a tile"
    max_side = max(height, width)
    if not _is_gpu(device) and (max_pixels > CPU_TILE_PIXELS or max_side > CPU_TILE_SIDE):
        max_pixels, max_side = min(max_pixels, CPU_TILE_PIXELS), CPU_TILE_SIDE
        budget_words = f"at most {CPU_TILE_SIDE} px a side on a CPU"
    if height * width <= max_pixels and max(height, width) <= max_side:
        return TilePlan((height, width), (0,), (0,), 0, f"auto: the whole plane in one pass ({budget_words})")
    overlap = border_margin(architecture)
    best = None
    for ny in range(1, height + 1):
        th, ys = axis_tiles(height, ny, overlap)
        if ny > 1 and th < 2 * overlap:          # tiles mostly overlap from here on
            break
        if th > max_side:
            continue
        max_width = min(max_pixels // th, max_side)
        if max_width <= overlap or max_width < MIN_TILE:
            continue
        tw, xs = axis_tiles(width, _counts(width, overlap, max_width), overlap)
        plan = TilePlan((th, tw), tuple(ys), tuple(xs), overlap, "")
        if best is None or (plan.pixels, plan.count) < (best.pixels, best.count):
            best = plan
    if best is None:            # a budget below what any tiling with this overlap needs
        side = max(MIN_TILE, int(math.isqrt(max_pixels)))
        return plan_tiles(shape, architecture, tile=side)
    th, tw = best.tile
    return TilePlan(best.tile, best.ys, best.xs, overlap,
                    f"auto: {best.count} tiles of {th}×{tw} px ({budget_words})")


#: The most tiles (or planes of a stack) one GPU batch holds.
MAX_GPU_BATCH = 16
#: On a CPU, small tiles run in batches of about this many pixels in all: eight 256² planes ran
#: 1.3x faster four at a time than one at a time (2 threads), where 512² tiles gain nothing.
CPU_BATCH_PIXELS = 512 * 512


def batch_size(plan: TilePlan, architecture: str, device=None, memory_budget_bytes: Optional[int] = None) -> int:
    """How many tiles of ``plan`` (or whole planes, when a plane is one tile) run as one batch.

    On a GPU, as many as the budget holds (at most :data:`MAX_GPU_BATCH`): a batch keeps its
    cores busy.  On a CPU, small tiles together up to :data:`CPU_BATCH_PIXELS`, larger ones one
    at a time (``bench/tile_policy.py --batch``)."""
    per_tile = plan.tile[0] * plan.tile[1]
    if not _is_gpu(device):
        return int(max(1, min(MAX_GPU_BATCH, CPU_BATCH_PIXELS // per_tile)))
    per_tile *= bytes_per_pixel(architecture)
    return int(max(1, min(MAX_GPU_BATCH, memory_budget(device, memory_budget_bytes) // per_tile)))


def _is_gpu(device) -> bool:
    return getattr(device, "type", str(device)).startswith("cuda")
