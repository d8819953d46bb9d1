"""Building blocks shared by the RWKV segmentation families.

Module and parameter names follow Vision-RWKV (``spatial_decay``,
``spatial_mix_k``, ``key``, ...) so official checkpoints load by name.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops import bi_wkv, depthwise_conv2d


def q_shift(x: torch.Tensor, hw: tuple, shift: int = 1, gamma: float = 0.25) -> torch.Tensor:
    """Vision-RWKV's quad-directional token shift of ``x`` (B, T, C) on an (H, W) grid.

    Four channel groups of ``gamma * C`` move right, left, down and up by
    ``shift`` pixels with zero fill; the remaining channels pass unchanged.
    """
    if torch.is_grad_enabled() and x.requires_grad:
        return _QShift.apply(x, hw, shift, gamma)
    return _shift_groups(x, hw, shift, gamma, reverse=False)


class _QShift(torch.autograd.Function):
    """The shift's gradient is its adjoint, the same shift in the opposite directions: one
    pass.  Autograd through the slice assignments zero-filled and summed a full-size
    gradient per group instead (CPU training of rwkv_unet_t: CCM's shift at 256 px, batch 4,
    ~70 ms backward against 5 ms forward)."""

    @staticmethod
    def forward(ctx, x, hw, shift, gamma):
        ctx.hw, ctx.shift, ctx.gamma = hw, shift, gamma
        return _shift_groups(x, hw, shift, gamma, reverse=False)

    @staticmethod
    def backward(ctx, grad):
        return _shift_groups(grad.contiguous(), ctx.hw, ctx.shift, ctx.gamma, reverse=True), None, None, None


def _shift_groups(x, hw, shift, gamma, reverse: bool):
    """:func:`q_shift`, or with ``reverse`` its adjoint (right <-> left, down <-> up)."""
    B, T, C = x.shape
    H, W = hw
    g = int(C * gamma)
    grid = x.transpose(1, 2).reshape(B, C, H, W)
    out = torch.empty_like(grid)            # every element is written once below: no memset
    sw, sh = min(shift, W), min(shift, H)
    right, left, down, up = (slice(i * g, (i + 1) * g) for i in range(4))
    if reverse:
        right, left, down, up = left, right, up, down
    out[:, right, :, sw:] = grid[:, right, :, :W - sw]
    out[:, right, :, :sw] = 0
    out[:, left, :, :W - sw] = grid[:, left, :, sw:]
    out[:, left, :, W - sw:] = 0
    out[:, down, sh:, :] = grid[:, down, :H - sh, :]
    out[:, down, :sh, :] = 0
    out[:, up, :H - sh, :] = grid[:, up, sh:, :]
    out[:, up, H - sh:, :] = 0
    out[:, 4 * g:] = grid[:, 4 * g:]
    return out.flatten(2).transpose(1, 2)


def lerp_mix(x, shifted, mix):
    """x * mix + shifted * (1 - mix), as one op with one output.  ``mix`` (a float32
    parameter) takes the activations' dtype: torch.lerp refuses mixed dtypes, and under
    autocast the activations are bfloat16/float16."""
    return torch.lerp(shifted, x, mix.to(x.dtype))


def _fresh_in_place(fn_in_place, fn, x):
    """``fn(x)``; without autograd, ``fn_in_place`` overwrites ``x`` instead.  Only for an
    ``x`` that nothing else holds (a projection's fresh output): at 512x512 each new
    activation map costs a 10-50 MB allocation and its page faults."""
    return fn(x) if torch.is_grad_enabled() else fn_in_place(x)


def add_to_fresh(fresh: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """``fresh + other`` (a residual add); without autograd, into ``fresh``, which must be an
    output nothing else holds."""
    return _fresh_in_place(lambda f: f.add_(other), lambda f: f + other, fresh)


class SpatialMix(nn.Module):
    """VRWKV spatial mix: Q-shift, lerp, bias-free K/V/R, Bi-WKV, optional key norm, gated output.

    ``init="fancy"`` is Vision-RWKV's layer-dependent init; ``init="zero"`` is
    RWKV-UNet's (decay and first 0, mixes 0.5).
    """

    def __init__(self, dim: int, layer_id: int = 0, n_layer: int = 1, key_norm: bool = False,
                 init: str = "fancy", shift_pixel: int = 1):
        super().__init__()
        self.shift_pixel = shift_pixel
        self.spatial_decay = nn.Parameter(torch.zeros(dim))
        self.spatial_first = nn.Parameter(torch.zeros(dim))
        self.spatial_mix_k = nn.Parameter(torch.full((1, 1, dim), 0.5))
        self.spatial_mix_v = nn.Parameter(torch.full((1, 1, dim), 0.5))
        self.spatial_mix_r = nn.Parameter(torch.full((1, 1, dim), 0.5))
        self.key = nn.Linear(dim, dim, bias=False)
        self.value = nn.Linear(dim, dim, bias=False)
        self.receptance = nn.Linear(dim, dim, bias=False)
        self.key_norm = nn.LayerNorm(dim) if key_norm else None
        self.output = nn.Linear(dim, dim, bias=False)
        if init == "fancy":
            self._fancy_init(layer_id, n_layer)
        elif init != "zero":
            raise ValueError(f"SpatialMix init={init!r}: use 'fancy' or 'zero'")

    @torch.no_grad()
    def _fancy_init(self, layer_id: int, n_layer: int):
        C = self.spatial_decay.numel()
        depth = layer_id / max(n_layer - 1, 1)            # 0 .. 1 through the network
        shallowness = 1.0 - layer_id / n_layer             # 1 .. ~0
        h = torch.arange(C, dtype=torch.float64)
        self.spatial_decay.copy_(-5 + 8 * (h / max(C - 1, 1)) ** (0.7 + 1.3 * depth))
        zigzag = torch.tensor([(i + 1) % 3 - 1 for i in range(C)], dtype=torch.float64) * 0.5
        self.spatial_first.copy_(math.log(0.3) + zigzag)
        x = (torch.arange(C, dtype=torch.float64) / C).view(1, 1, C)
        self.spatial_mix_k.copy_(x ** shallowness)
        self.spatial_mix_v.copy_(x ** shallowness + 0.3 * depth)
        self.spatial_mix_r.copy_(x ** (0.5 * shallowness))

    def forward(self, x: torch.Tensor, hw: tuple) -> torch.Tensor:
        T = x.shape[1]
        shifted = q_shift(x, hw, self.shift_pixel)
        k = self.key(lerp_mix(x, shifted, self.spatial_mix_k))
        v = self.value(lerp_mix(x, shifted, self.spatial_mix_v))
        r = _fresh_in_place(torch.sigmoid_, torch.sigmoid, self.receptance(lerp_mix(x, shifted, self.spatial_mix_r)))
        wkv = bi_wkv(self.spatial_decay / T, self.spatial_first / T, k, v)
        if self.key_norm is not None:
            wkv = self.key_norm(wkv)
        return self.output(_fresh_in_place(lambda r: r.mul_(wkv), lambda r: r * wkv, r))


class ChannelMix(nn.Module):
    """RWKV channel mix: Q-shift, lerp, squared-ReLU MLP gated by sigmoid(receptance)."""

    def __init__(self, dim: int, hidden_rate: int = 4, layer_id: int = 0, n_layer: int = 1,
                 key_norm: bool = False, init: str = "fancy", shift_pixel: int = 1):
        super().__init__()
        hidden = hidden_rate * dim
        self.shift_pixel = shift_pixel
        self.spatial_mix_k = nn.Parameter(torch.full((1, 1, dim), 0.5))
        self.spatial_mix_r = nn.Parameter(torch.full((1, 1, dim), 0.5))
        self.key = nn.Linear(dim, hidden, bias=False)
        self.key_norm = nn.LayerNorm(hidden) if key_norm else None
        self.receptance = nn.Linear(dim, dim, bias=False)
        self.value = nn.Linear(hidden, dim, bias=False)
        if init == "fancy":
            with torch.no_grad():
                x = (torch.arange(dim, dtype=torch.float64) / dim).view(1, 1, dim)
                ratio = (1.0 - layer_id / n_layer)
                self.spatial_mix_k.copy_(x ** ratio)
                self.spatial_mix_r.copy_(x ** ratio)
        elif init != "zero":
            raise ValueError(f"ChannelMix init={init!r}: use 'fancy' or 'zero'")

    def forward(self, x: torch.Tensor, hw: tuple) -> torch.Tensor:
        shifted = q_shift(x, hw, self.shift_pixel)
        k = _fresh_in_place(lambda k: k.relu_().square_(), lambda k: torch.square(torch.relu(k)),
                            self.key(lerp_mix(x, shifted, self.spatial_mix_k)))
        if self.key_norm is not None:
            k = self.key_norm(k)
        gate = self.receptance(lerp_mix(x, shifted, self.spatial_mix_r))
        value = self.value(k)
        return _fresh_in_place(lambda g: g.sigmoid_().mul_(value), lambda g: torch.sigmoid(g) * value, gate)


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a (B, C, H, W) map."""

    def forward(self, x):
        return F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias,
                            self.eps).permute(0, 3, 1, 2)


class DropPath(nn.Module):
    """Stochastic depth per sample (identity in eval mode or at rate 0)."""

    def __init__(self, rate: float = 0.0):
        super().__init__()
        self.rate = rate

    def forward(self, x):
        if self.rate == 0.0 or not self.training:
            return x
        keep = 1.0 - self.rate
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep


class DepthwiseConv2d(nn.Conv2d):
    """A depthwise ``nn.Conv2d`` (groups == channels) whose weight gradient on the CPU comes
    from :func:`..ops.depthwise_conv2d`, which uses its own where bench/depthwise.py measured
    it faster than oneDNN's (1.1-3x per layer).  The same parameters and the same function;
    without gradients it runs plain ``F.conv2d``."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not (self.groups == self.in_channels == self.out_channels and self.dilation == (1, 1)
                and self.padding_mode == "zeros" and not isinstance(self.padding, str)):
            raise ValueError(f"DepthwiseConv2d takes groups == in == out channels, no dilation, zero padding: {self}")

    def forward(self, x):
        return depthwise_conv2d(x, self.weight, self.bias, self.stride, self.padding)


def conv_bn_act(c_in: int, c_out: int, kernel: int = 1, stride: int = 1, groups: int = 1,
                act: type = nn.ReLU, norm: bool = True) -> nn.Sequential:
    """Conv (no bias) + BatchNorm + activation; ``act=None``/``norm=False`` drop those."""
    conv = DepthwiseConv2d if groups > 1 and groups == c_in == c_out else nn.Conv2d
    layers = [conv(c_in, c_out, kernel, stride, kernel // 2, groups=groups, bias=not norm)]
    if norm:
        layers.append(nn.BatchNorm2d(c_out))
    if act is not None:
        layers.append(act())
    return nn.Sequential(*layers)


def pad_to_multiple(x: torch.Tensor, multiple: int):
    """Pad (B, C, H, W) on the bottom/right to multiples of ``multiple``; returns (x, (H, W))."""
    H, W = x.shape[-2:]
    ph, pw = (-H) % multiple, (-W) % multiple
    if ph or pw:
        # Reflection keeps image statistics at the border; tiny inputs can only replicate.
        mode = "reflect" if ph < H and pw < W else "replicate"
        x = F.pad(x, (0, pw, 0, ph), mode=mode)
    return x, (H, W)


def tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H*W, C)."""
    return x.flatten(2).transpose(1, 2)


def grid(x: torch.Tensor, hw: tuple) -> torch.Tensor:
    """(B, H*W, C) -> (B, C, H, W)."""
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], *hw)
