"""Depthwise-convolution weight gradient as a forward depthwise convolution.

The gradient of channel c's kernel is the cross-correlation of each image's input plane
with its output-gradient plane, read at the k x k lags the kernel spans, summed over
images.  With every (image, channel) plane as a channel of one image and every gradient
plane as that channel's kernel, this is one depthwise convolution whose output is k x k:
oneDNN's forward depthwise kernel runs it at near memory speed.  (oneDNN's own
backward-weights kernel for depthwise convolutions on channels_last tensors pads every
channel to a block of 8 by 8, and on AVX2 takes ~10x the time of the forward pass:
measured in bench/depthwise.py.)

A stride s is handled by its s x s polyphase components: taps (i, j) with i = a (mod s),
j = b (mod s) read only the pixels (a + s y, b + s x) of the padded input, so each
component is a stride-1 correlation with its own, smaller set of lags.
"""
import torch
import torch.nn.functional as F


def depthwise_weight_grad_by_correlation(grad_out: torch.Tensor, x: torch.Tensor, kernel_size, stride,
                                         padding) -> torch.Tensor:
    """d loss / d weight, (C, 1, kh, kw), of ``F.conv2d(x, weight, stride=stride, padding=padding, groups=C)``
    given ``grad_out`` (B, C, Ho, Wo); in the dtype of ``x``."""
    (kh, kw), (sh, sw), (ph, pw) = kernel_size, stride, padding
    B, C = x.shape[:2]
    Ho, Wo = grad_out.shape[-2:]
    kernels = grad_out.contiguous().view(B * C, 1, Ho, Wo)
    grad = x.new_empty(C, 1, kh, kw)
    for a in range(min(sh, kh)):
        for b in range(min(sw, kw)):
            lags_h, lags_w = len(range(a, kh, sh)), len(range(b, kw, sw))
            h, w = Ho + lags_h - 1, Wo + lags_w - 1
            planes = _polyphase_component(x, (a, b), (sh, sw), (ph, pw), (h, w)).view(1, B * C, h, w)
            lags = F.conv2d(planes, kernels, groups=B * C)                  # (1, B*C, lags_h, lags_w)
            grad[:, 0, a::sh, b::sw] = lags.view(B, C, lags_h, lags_w).sum(0)
    return grad


def _polyphase_component(x, offset, stride, padding, size):
    """Rows a, a + sh, ... and columns b, b + sw, ... of ``x`` zero-padded by ``padding``, the
    first ``size`` of each, as a contiguous (B, C, h, w) tensor: one copy of the pixels it
    holds, no padded copy of the whole input (and zeros past the input's far edge, where lags
    reach beyond it)."""
    B, C, H, W = x.shape
    out = x.new_empty(B, C, *size)
    (r0, r1), (c0, c1) = (_inside(n, o, s, p, m) for n, o, s, p, m in zip((H, W), offset, stride, padding, size))
    if r1 <= r0 or c1 <= c0:
        return out.zero_()
    out[:, :, :r0] = 0
    out[:, :, r1:] = 0
    out[:, :, r0:r1, :c0] = 0
    out[:, :, r0:r1, c1:] = 0
    (sh, sw), (ph, pw), (a, b) = stride, padding, offset
    y0, x0 = a + sh * r0 - ph, b + sw * c0 - pw
    out[:, :, r0:r1, c0:c1] = x[:, :, y0:y0 + sh * (r1 - r0 - 1) + 1:sh, x0:x0 + sw * (c1 - c0 - 1) + 1:sw]
    return out


def _inside(n: int, offset: int, stride: int, pad: int, size: int):
    """The range [first, end) of component indices i < size whose padded position
    offset + stride * i falls on the input (0 <= offset + stride * i - pad < n)."""
    first = max(0, -(-(pad - offset) // stride))
    end = min(size, (n - 1 + pad - offset) // stride + 1)
    return first, max(first, end)
