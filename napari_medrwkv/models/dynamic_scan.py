"""DS-VRWKV: a lightweight dynamic-scan Vision-RWKV segmenter for high-resolution images.

Layout (``ds_vrwkv_t``; ``ds_vrwkv_s`` is wider)::

    input --pad to /32--> conv s2 (1/2) --> conv s2 (1/4)
      level 0..3 at 1/4, 1/8, 1/16, 1/32: [stride-2 conv + LN] + N x DSBlock
      decoder 1/32 -> 1/4: bilinear x2, concat skip, 1x1 conv-BN-ReLU, windowed RWKV mix
      head: bilinear x2, concat stem (1/2), 1x1 + depthwise 3x3, bilinear x2, 1x1 conv
      -> logits cropped back to (H, W)

**DSBlock** (pre-norm, residual, as Vision-RWKV)::

    t = t + LocalGlobalMix(ln1(t))      local windows + pooled global context
    t = t + ChannelMix(ln2(t))          Vision-RWKV channel mix (Q-shift on the 2-D grid)

* *local* branch (:class:`ScanSpatialMix`): the map is cut into non-overlapping
  ``window x window`` blocks (clipped to the map, reflect-padded inside to a
  multiple and cropped after); each block is one short token sequence in the
  block's scan order and mixed by Bi-WKV.
* *global* branch (:class:`PooledGlobalMix`): the map is average-pooled to at
  most ``global_grid x global_grid`` tokens; keys and values come only from
  that pooled grid (this is where the cost cut is: K/V projections and Bi-WKV
  run on <= 256 tokens), Bi-WKV runs over the whole pooled grid in the block's
  scan order, the result is projected, upsampled bilinearly and gated per pixel
  and channel by a full-resolution receptance ``sigmoid(R)``.  That learned,
  data-dependent gate is the fusion: ``mix = local + sigmoid(R_full) * up(global)``,
  where both ``local`` and ``global`` end in their own linear output projection
  (so without the gate the sum would be a 1x1 conv over their concatenation).

**Dynamic scan.**  Block ``i`` (counted through encoder and decoder) scans in
order ``ORDERS[i % 3]`` -- rows (raster), cols (transposed raster) or snake
(boustrophedon) -- and reversed when ``i`` is odd, so six consecutive blocks
see all six combinations.  Orders are index permutations of the flattened
token grid, and the exact inverse permutation is applied to the outputs.

Honest note on direction: Bi-WKV itself is symmetric under reversing the
sequence (its weights depend on ``|t - i|`` only), so reversing the scan alone
would change nothing; the *order* (rows/cols/snake) is what changes which
tokens are near each other in 1-D.  To make direction matter, the spatial mixes
here replace Vision-RWKV's Q-shift by the original RWKV 1-D token shift *along
the scan sequence*: every token is lerped with its predecessor in scan order
(zero when that predecessor is not a 4-neighbour on the grid, e.g. at a raster
row start, and at the start of each sequence).  A forward raster scan thus
shifts in the left neighbour and the reversed one the right neighbour (upper /
lower for column scans; alternating per row for snake).  The channel mixes and
the global branch's full-resolution receptance keep the 2-D Q-shift, so every
block still mixes all four neighbours.

Cost (``bench/flops.py``, matmul/conv FLOPs + 10*B*T*C per Bi-WKV call), at
1x3x512x512: ds_vrwkv_t 3.0 GMACs / 3.0 M params, ds_vrwkv_s 6.7 GMACs /
6.8 M params, against rwkv_unet_t's 14.1 GMACs / 3.1 M params.
"""
from functools import lru_cache
from typing import Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops import bi_wkv
from .layers import (ChannelMix, DropPath, LayerNorm2d, SpatialMix, conv_bn_act, grid, lerp_mix,
                     pad_to_multiple, q_shift, tokens)
from .registry import register_model

__all__ = ["ORDERS", "scan_permutation", "inverse_permutation", "window_scan_permutation",
           "scan_neighbour_mask", "to_scan_sequences", "from_scan_sequences", "scan_shift",
           "ScanSpatialMix", "PooledGlobalMix", "LocalGlobalMix", "DSBlock", "DecoderBlock",
           "DynamicScanVRWKV", "ds_vrwkv_t", "ds_vrwkv_s"]

ORDERS = ("rows", "cols", "snake")
_STRIDE = 32  # stem (4) x three stride-2 downsamplings


# --------------------------------------------------------------------------- scan orders

def scan_permutation(h: int, w: int, order: str, reverse: bool = False) -> torch.Tensor:
    """Permutation ``perm`` of the row-major flattened (h, w) grid: ``seq = flat[perm]``.

    ``rows``: raster; ``cols``: column by column (transposed raster);
    ``snake``: raster with every odd row run right-to-left.  ``reverse`` flips
    the sequence.
    """
    idx = torch.arange(h * w).view(h, w)
    if order == "rows":
        perm = idx.flatten()
    elif order == "cols":
        perm = idx.t().flatten()
    elif order == "snake":
        idx = idx.clone()
        idx[1::2] = idx[1::2].flip(1)
        perm = idx.flatten()
    else:
        raise ValueError(f"scan order {order!r}: use one of {', '.join(ORDERS)}")
    return perm.flip(0) if reverse else perm


def inverse_permutation(perm: torch.Tensor) -> torch.Tensor:
    """``inv`` with ``seq[..., inv] == flat`` whenever ``seq == flat[..., perm]``."""
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=perm.device)
    return inv


def window_scan_permutation(H: int, W: int, wh: int, ww: int, order: str,
                            reverse: bool = False) -> torch.Tensor:
    """Permutation of the flattened (H, W) grid (multiples of (wh, ww)) that lists
    the ``wh x ww`` windows one after another (row-major over windows), each in
    scan order.  ``H == wh and W == ww`` gives :func:`scan_permutation`."""
    if H % wh or W % ww:
        raise ValueError(f"grid {H}x{W} is not a multiple of the window {wh}x{ww}")
    local = scan_permutation(wh, ww, order, reverse)
    local_r, local_c = local // ww, local % ww                        # (L,)
    win_r = torch.arange(0, H, wh).view(-1, 1, 1)
    win_c = torch.arange(0, W, ww).view(1, -1, 1)
    return ((win_r + local_r) * W + win_c + local_c).flatten()


def scan_neighbour_mask(h: int, w: int, order: str, reverse: bool = False) -> torch.Tensor:
    """Bool (h*w,): True where the previous token of the scan sequence is a
    4-neighbour on the grid (False at the start and at raster row jumps)."""
    perm = scan_permutation(h, w, order, reverse)
    r, c = perm // w, perm % w
    mask = torch.zeros(h * w, dtype=torch.bool)
    mask[1:] = ((r[1:] - r[:-1]).abs() + (c[1:] - c[:-1]).abs()) == 1
    return mask


@lru_cache(maxsize=256)
def _scan_plan(H: int, W: int, wh: int, ww: int, order: str, reverse: bool, device: str):
    # Cached across calls, so never built as inference tensors: a plan first made under
    # inference_mode would otherwise break every later training step.
    with torch.inference_mode(False):
        perm = window_scan_permutation(H, W, wh, ww, order, reverse)
        inv = inverse_permutation(perm)
        mask = scan_neighbour_mask(wh, ww, order, reverse).float().view(1, -1, 1)
        return perm.to(device), inv.to(device), mask.to(device)


def to_scan_sequences(x: torch.Tensor, hw: Tuple[int, int], window: Tuple[int, int],
                      order: str, reverse: bool = False):
    """(B, H*W, C) tokens -> (B * n_windows, L, C) sequences in scan order, plus a
    context for :func:`from_scan_sequences`.

    The window is clipped to the grid; the grid is reflect-padded on the
    bottom/right to a multiple of it (padding is always smaller than the grid,
    so reflection is defined) and cropped again on the way back.
    """
    B, T, C = x.shape
    H, W = hw
    wh, ww = min(window[0], H), min(window[1], W)
    ph, pw = (-H) % wh, (-W) % ww
    if ph or pw:
        x = tokens(F.pad(grid(x, hw), (0, pw, 0, ph), mode="reflect"))
    Hp, Wp = H + ph, W + pw
    perm, inv, mask = _scan_plan(Hp, Wp, wh, ww, order, bool(reverse), str(x.device))
    seqs = x[:, perm].reshape(B * (Hp // wh) * (Wp // ww), wh * ww, C)
    return seqs, (B, hw, (Hp, Wp), inv, mask)


def from_scan_sequences(seqs: torch.Tensor, ctx) -> torch.Tensor:
    """Exact inverse of :func:`to_scan_sequences` (un-permute, crop the padding)."""
    B, (H, W), (Hp, Wp), inv, _ = ctx
    x = seqs.reshape(B, Hp * Wp, seqs.shape[-1])[:, inv]
    if (Hp, Wp) != (H, W):
        x = tokens(grid(x, (Hp, Wp))[:, :, :H, :W])
    return x


def scan_shift(seqs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """RWKV 1-D token shift along the scan: token t receives token t-1 where the
    two are grid neighbours (``mask`` (1, L, 1)), zero elsewhere."""
    return F.pad(seqs[:, :-1], (0, 0, 1, 0)) * mask.to(seqs.dtype)


# --------------------------------------------------------------------------- mixing modules

class ScanSpatialMix(SpatialMix):
    """Vision-RWKV spatial mix on local windows in a given scan order.

    Same parameters (names, "fancy" init) as :class:`SpatialMix`; the token
    shift is the 1-D shift along the scan sequence (see the module docstring),
    Bi-WKV runs on each window's sequence with ``w, u`` divided by its length.
    """

    def __init__(self, dim: int, layer_id: int = 0, n_layer: int = 1, window: int = 8,
                 order: str = "rows", reverse: bool = False, init: str = "fancy"):
        super().__init__(dim, layer_id, n_layer, key_norm=False, init=init)
        if order not in ORDERS:
            raise ValueError(f"scan order {order!r}: use one of {', '.join(ORDERS)}")
        self.window = window
        self.order = order
        self.reverse = bool(reverse)

    def forward(self, x: torch.Tensor, hw: tuple) -> torch.Tensor:
        seqs, ctx = to_scan_sequences(x, hw, (self.window, self.window), self.order, self.reverse)
        shifted = scan_shift(seqs, ctx[-1])
        L = seqs.shape[1]
        k = self.key(lerp_mix(seqs, shifted, self.spatial_mix_k))
        v = self.value(lerp_mix(seqs, shifted, self.spatial_mix_v))
        r = torch.sigmoid(self.receptance(lerp_mix(seqs, shifted, self.spatial_mix_r)))
        out = self.output(r * bi_wkv(self.spatial_decay / L, self.spatial_first / L, k, v))
        return from_scan_sequences(out, ctx)

    def extra_repr(self) -> str:
        return f"window={self.window}, order={self.order}, reverse={self.reverse}"


class PooledGlobalMix(SpatialMix):
    """Global context from pooled keys/values, gated by a full-resolution receptance.

    The (H, W) map is average-pooled to at most ``grid_size x grid_size``
    tokens; K and V are taken from that grid (1-D scan shift in its scan
    order), Bi-WKV runs over the whole pooled sequence, ``output`` projects it
    and bilinear upsampling brings it back to (H, W), where
    ``sigmoid(receptance(lerp(x, q_shift(x))))`` gates it per pixel.
    """

    def __init__(self, dim: int, layer_id: int = 0, n_layer: int = 1, grid_size: int = 16,
                 order: str = "rows", reverse: bool = False, init: str = "fancy"):
        super().__init__(dim, layer_id, n_layer, key_norm=False, init=init)
        if order not in ORDERS:
            raise ValueError(f"scan order {order!r}: use one of {', '.join(ORDERS)}")
        self.grid_size = grid_size
        self.order = order
        self.reverse = bool(reverse)

    def pooled_size(self, hw: tuple) -> Tuple[int, int]:
        H, W = hw
        stride = max(1, -(-H // self.grid_size), -(-W // self.grid_size))
        return -(-H // stride), -(-W // stride)

    def forward(self, x: torch.Tensor, hw: tuple) -> torch.Tensor:
        g_hw = self.pooled_size(hw)
        pooled = grid(x, hw)
        if tuple(g_hw) != tuple(hw):
            pooled = F.adaptive_avg_pool2d(pooled, g_hw)
        seqs, ctx = to_scan_sequences(tokens(pooled), g_hw, g_hw, self.order, self.reverse)
        shifted = scan_shift(seqs, ctx[-1])
        T = seqs.shape[1]
        k = self.key(lerp_mix(seqs, shifted, self.spatial_mix_k))
        v = self.value(lerp_mix(seqs, shifted, self.spatial_mix_v))
        ctx_tokens = self.output(bi_wkv(self.spatial_decay / T, self.spatial_first / T, k, v))
        glob = grid(from_scan_sequences(ctx_tokens, ctx), g_hw)
        if tuple(g_hw) != tuple(hw):
            glob = F.interpolate(glob, size=tuple(hw), mode="bilinear", align_corners=False)
        r = torch.sigmoid(self.receptance(lerp_mix(x, q_shift(x, hw, self.shift_pixel), self.spatial_mix_r)))
        return r * tokens(glob)

    def extra_repr(self) -> str:
        return f"grid_size={self.grid_size}, order={self.order}, reverse={self.reverse}"


class LocalGlobalMix(nn.Module):
    """``local(x) + global(x)``: windowed scan mix plus the gated pooled global context."""

    def __init__(self, dim: int, layer_id: int, n_layer: int, window: int, grid_size: int,
                 order: str, reverse: bool):
        super().__init__()
        self.local = ScanSpatialMix(dim, layer_id, n_layer, window, order, reverse)
        self.glob = PooledGlobalMix(dim, layer_id, n_layer, grid_size, order, reverse)

    def forward(self, x: torch.Tensor, hw: tuple) -> torch.Tensor:
        return self.local(x, hw) + self.glob(x, hw)


class DSBlock(nn.Module):
    """Pre-norm encoder block on tokens (B, T, C): local/global scan mix, then ChannelMix."""

    def __init__(self, dim: int, layer_id: int, n_layer: int, window: int = 8,
                 grid_size: int = 16, order: str = "rows", reverse: bool = False,
                 hidden_rate: int = 4, drop_path: float = 0.0):
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.att = LocalGlobalMix(dim, layer_id, n_layer, window, grid_size, order, reverse)
        self.ln2 = nn.LayerNorm(dim)
        self.ffn = ChannelMix(dim, hidden_rate, layer_id, n_layer)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor, hw: tuple) -> torch.Tensor:
        x = x + self.drop_path(self.att(self.ln1(x), hw))
        return x + self.drop_path(self.ffn(self.ln2(x), hw))


class DecoderBlock(nn.Module):
    """Upsample x2 (bilinear), concat the skip, 1x1 conv-BN-ReLU, then a residual
    windowed scan RWKV mix (the whole map when it fits in one window)."""

    def __init__(self, c_in: int, c_skip: int, c_out: int, layer_id: int, n_layer: int,
                 window: int = 8, order: str = "rows", reverse: bool = False,
                 drop_path: float = 0.0):
        super().__init__()
        self.fuse = conv_bn_act(c_in + c_skip, c_out, 1)
        self.ln = nn.LayerNorm(c_out)
        self.att = ScanSpatialMix(c_out, layer_id, n_layer, window, order, reverse)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        hw = tuple(skip.shape[-2:])
        x = F.interpolate(x, size=hw, mode="bilinear", align_corners=False)
        t = tokens(self.fuse(torch.cat([x, skip], 1)))
        t = t + self.drop_path(self.att(self.ln(t), hw))
        return grid(t, hw)


class _Head(nn.Module):
    """1/4 -> full resolution: x2, concat the 1/2 stem features, 1x1 + depthwise 3x3,
    x2, 1x1 classifier at full resolution."""

    def __init__(self, c_in: int, c_stem: int, num_classes: int):
        super().__init__()
        self.fuse = conv_bn_act(c_in + c_stem, c_stem, 1)
        self.dw = conv_bn_act(c_stem, c_stem, 3, groups=c_stem)
        self.classifier = nn.Conv2d(c_stem, num_classes, 1)

    def forward(self, x: torch.Tensor, stem: torch.Tensor, out_hw: tuple) -> torch.Tensor:
        x = F.interpolate(x, size=tuple(stem.shape[-2:]), mode="bilinear", align_corners=False)
        x = self.dw(self.fuse(torch.cat([x, stem], 1)))
        x = F.interpolate(x, size=tuple(out_hw), mode="bilinear", align_corners=False)
        return self.classifier(x)


# --------------------------------------------------------------------------- the model

class DynamicScanVRWKV(nn.Module):
    """Dynamic-scan local/global Vision-RWKV U-shaped segmenter (see module docstring).

    Maps (B, in_chans, H, W) to logits (B, num_classes, H, W) for any H, W
    (padded to a multiple of 32 inside, logits cropped back).
    """

    encoder_parts = ("stem1", "stem2", "downs", "levels")   # what TrainConfig(freeze="encoder") holds fixed

    def __init__(self, in_chans: int = 3, num_classes: int = 1,
                 dims: Sequence[int] = (32, 64, 128, 192), depths: Sequence[int] = (2, 2, 4, 2),
                 stem_chans: int = 16, window: int = 8, global_grid: int = 16,
                 hidden_rate: int = 4, drop_path_rate: float = 0.0):
        super().__init__()
        if len(dims) != 4 or len(depths) != 4 or min(depths) < 1:
            raise ValueError("dims and depths need 4 entries each, depths >= 1")
        if in_chans < 1 or num_classes < 1:
            raise ValueError(f"in_chans and num_classes must be >= 1, got {in_chans}, {num_classes}")
        self.in_chans, self.num_classes = in_chans, num_classes
        n_enc = sum(depths)
        n_layer = n_enc + 3                                  # + three decoder mixes
        rates = torch.linspace(0, drop_path_rate, n_enc).tolist()

        def scan(i):
            return ORDERS[i % len(ORDERS)], i % 2 == 1

        self.stem1 = conv_bn_act(in_chans, stem_chans, 3, stride=2)
        self.stem2 = conv_bn_act(stem_chans, dims[0], 3, stride=2)
        self.downs = nn.ModuleList(
            nn.Sequential(nn.Conv2d(dims[i], dims[i + 1], 3, 2, 1), LayerNorm2d(dims[i + 1]))
            for i in range(3))
        self.levels = nn.ModuleList()
        i = 0
        for dim, depth in zip(dims, depths):
            blocks = nn.ModuleList()
            for _ in range(depth):
                order, reverse = scan(i)
                blocks.append(DSBlock(dim, i, n_layer, window, global_grid, order, reverse,
                                      hidden_rate, rates[i]))
                i += 1
            self.levels.append(blocks)
        self.decoders = nn.ModuleList()
        for lvl in (2, 1, 0):
            order, reverse = scan(i)
            self.decoders.append(DecoderBlock(dims[lvl + 1], dims[lvl], dims[lvl], i, n_layer,
                                              window, order, reverse))
            i += 1
        self.head = _Head(dims[0], stem_chans, num_classes)

    def scan_schedule(self):
        """[(module name, order, reverse)] of every scan mix, in network order."""
        return [(n, m.order, m.reverse) for n, m in self.named_modules()
                if isinstance(m, ScanSpatialMix)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_chans:
            raise ValueError(f"expected (B, {self.in_chans}, H, W), got {tuple(x.shape)}")
        x, (H, W) = pad_to_multiple(x, _STRIDE)
        stem = self.stem1(x)
        f = self.stem2(stem)
        skips = []
        for lvl, blocks in enumerate(self.levels):
            if lvl:
                f = self.downs[lvl - 1](f)
            hw = tuple(f.shape[-2:])
            t = tokens(f)
            for blk in blocks:
                t = blk(t, hw)
            f = grid(t, hw)
            skips.append(f)
        y = skips[-1]
        for dec, skip in zip(self.decoders, skips[-2::-1]):
            y = dec(y, skip)
        return self.head(y, stem, x.shape[-2:])[..., :H, :W]


_T_CFG = dict(dims=(32, 64, 128, 192), depths=(2, 2, 4, 2), stem_chans=16, hidden_rate=4)
_S_CFG = dict(dims=(48, 96, 192, 288), depths=(2, 2, 4, 2), stem_chans=24, hidden_rate=4)


@register_model
def ds_vrwkv_t(in_chans: int = 3, num_classes: int = 1, **kw) -> DynamicScanVRWKV:
    """Tiny dynamic-scan VRWKV: widths 32/64/128/192."""
    return DynamicScanVRWKV(in_chans=in_chans, num_classes=num_classes, **{**_T_CFG, **kw})


@register_model
def ds_vrwkv_s(in_chans: int = 3, num_classes: int = 1, **kw) -> DynamicScanVRWKV:
    """Small (wider) dynamic-scan VRWKV: widths 48/96/192/288."""
    return DynamicScanVRWKV(in_chans=in_chans, num_classes=num_classes, **{**_S_CFG, **kw})
