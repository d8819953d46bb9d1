"""Depthwise 2-D convolution with a fast weight gradient on the CPU.

``depthwise_conv2d(x, weight, bias, stride, padding)`` is ``F.conv2d(..., groups=C)``.
Its forward and input gradient are oneDNN's (fast); when gradients are taken on the
CPU in float32 its weight gradient comes from :func:`depthwise_weight_grad_by_correlation`
where that is measured to be faster than oneDNN's own (``bench/depthwise.py``): every
stride-1 layer, and strided ones on large planes.  Training rwkv_unet_t on the CPU (batch 4,
256 px, 2 threads) spent a fifth of each step in oneDNN's depthwise weight gradients, 490 ms;
these take 310 ms, and a whole step 3-4% less time (6% at batch 8).

:func:`depthwise_weight_grad_naive` is the float64 reference the tests compare with.
"""
import os

import torch
import torch.nn.functional as F

from .correlation import depthwise_weight_grad_by_correlation
from .naive import depthwise_weight_grad_naive

__all__ = ["depthwise_conv2d", "depthwise_weight_grad_by_correlation", "depthwise_weight_grad_naive",
           "weight_grad_path"]

# Strided layers on smaller planes are faster with oneDNN's own weight gradient
# (e.g. 160 channels at 128x128, stride 2: 37 against 52 ms on 2 threads).
_STRIDED_MIN_PIXELS = 256 * 256
_PATHS = ("correlation", "pytorch")


def weight_grad_path(x: torch.Tensor, stride) -> str:
    """``"correlation"`` or ``"pytorch"`` (PyTorch's own: oneDNN's on the CPU), the weight gradient
    a layer with input ``x`` gets.  ``MEDRWKV_DW_GRAD=pytorch|correlation`` forces one for
    float32 CPU tensors."""
    if x.device.type != "cpu" or x.dtype != torch.float32:
        return "pytorch"
    forced = os.environ.get("MEDRWKV_DW_GRAD", "").strip().lower()
    if forced:
        if forced not in _PATHS:
            raise ValueError(f"MEDRWKV_DW_GRAD={forced!r}: use one of {', '.join(_PATHS)} (or unset it).")
        return forced
    if tuple(stride) == (1, 1) or x.shape[-2] * x.shape[-1] >= _STRIDED_MIN_PIXELS:
        return "correlation"
    return "pytorch"


def depthwise_conv2d(x: torch.Tensor, weight: torch.Tensor, bias=None, stride=(1, 1), padding=(0, 0)) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, stride, padding, groups=C)`` for weight (C, 1, kh, kw), with
    the faster weight gradient where it applies (see the module docstring)."""
    stride, padding = _pair(stride), _pair(padding)
    # Under autocast the convolution runs in another dtype than x: PyTorch's own gradient then.
    if (torch.is_grad_enabled() and weight.requires_grad and weight_grad_path(x, stride) == "correlation"
            and not _cpu_autocast_enabled()):
        return _DepthwiseConv2d.apply(x, weight, bias, stride, padding)
    return F.conv2d(x, weight, bias, stride, padding, 1, weight.shape[0])


class _DepthwiseConv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding):
        ctx.save_for_backward(x, weight)
        ctx.stride, ctx.padding, ctx.has_bias = stride, padding, bias is not None
        return F.conv2d(x, weight, bias, stride, padding, 1, weight.shape[0])

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        stride, padding = list(ctx.stride), list(ctx.padding)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.ops.aten.convolution_backward(grad_out, x, weight, None, stride, padding, [1, 1], False,
                                                         [0, 0], weight.shape[0], [True, False, False])[0]
        if ctx.needs_input_grad[1]:
            grad_w = depthwise_weight_grad_by_correlation(grad_out, x, weight.shape[-2:], ctx.stride, ctx.padding)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_out.sum((0, 2, 3))
        return grad_x, grad_w, grad_b, None, None


def _cpu_autocast_enabled() -> bool:
    try:
        return torch.is_autocast_enabled("cpu")
    except TypeError:                      # PyTorch < 2.4 takes no device argument
        return torch.is_autocast_cpu_enabled()


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)
