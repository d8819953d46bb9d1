"""Inference-time graph surgery, the same function up to rounding: fold BatchNorm into the
convolution before it (and a block's BatchNorm pre-norm into the 1x1 convolution after it),
fuse a convolution with the activation after it, and run token projections as 1x1
convolutions on the CPU."""
import copy
import functools

import torch
import torch.nn as nn
import torch.nn.functional as F


def fuse_for_inference(net: nn.Module) -> nn.Module:
    """An eval-mode copy of ``net`` for inference only: every Conv2d -> BatchNorm2d pair
    inside an ``nn.Sequential`` folded into one conv, a block's BatchNorm pre-norm folded
    into its 1x1 expansion, each conv and the ReLU/SiLU after it fused (:class:`ConvAct`),
    and the token projections run as 1x1 convs (:class:`TokenLinear`).  ``net`` itself is
    left untouched."""
    net = copy.deepcopy(net).eval()
    sequentials = [module for module in net.modules() if isinstance(module, nn.Sequential)]
    for seq in sequentials:
        _fold_batchnorms(seq)
    for module in list(net.modules()):
        _fold_pre_norm(module)
    for seq in sequentials:
        _fuse_activations(seq)
    for module in list(net.modules()):
        for name, child in module.named_children():
            if type(child) is nn.Linear:
                setattr(module, name, TokenLinear.from_linear(child))
    return net


def fold_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """A conv equal to ``bn(conv(x))`` in eval mode."""
    fused = _uninitialised_conv(conv, conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                                conv.padding, conv.dilation, conv.groups, bias=True, padding_mode=conv.padding_mode)
    scale, shift = _bn_scale_shift(bn)
    with torch.no_grad():
        fused.weight.copy_(conv.weight * scale.view(-1, 1, 1, 1))
        fused.bias.copy_(shift if conv.bias is None else conv.bias * scale + shift)
    return fused


def fold_bn_into_next_conv(bn: nn.BatchNorm2d, conv: nn.Conv2d) -> nn.Conv2d:
    """A conv equal to ``conv(bn(x))`` in eval mode; ``conv`` must be 1x1 and ungrouped (a
    wider kernel would see the BatchNorm shift in its zero padding too)."""
    scale, shift = _bn_scale_shift(bn)
    fused = _uninitialised_conv(conv, conv.in_channels, conv.out_channels, 1, bias=True)
    with torch.no_grad():
        fused.weight.copy_(conv.weight * scale.view(1, -1, 1, 1))
        bias = conv.weight.flatten(1) @ shift
        fused.bias.copy_(bias if conv.bias is None else bias + conv.bias)
    return fused


def _bn_scale_shift(bn: nn.BatchNorm2d):
    """Eval-mode BatchNorm as ``x * scale + shift`` per channel."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return scale, bn.bias - bn.running_mean * scale


def _uninitialised_conv(like: nn.Conv2d, *args, **kwargs) -> nn.Conv2d:
    # Built on the meta device: a random init would be overwritten anyway, and drawing it
    # would move the global RNG, so a seeded run would depend on when a net was fused.
    conv = nn.Conv2d(*args, **kwargs, device="meta").to_empty(device=like.weight.device)
    return conv.to(like.weight.dtype)


def _fold_batchnorms(seq: nn.Sequential) -> None:
    names = list(seq._modules)
    for first, second in zip(names, names[1:]):
        conv, bn = seq._modules[first], seq._modules[second]
        if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d) and bn.track_running_stats:
            seq._modules[first] = fold_conv_bn(conv, bn)
            seq._modules[second] = nn.Identity()


def _fold_pre_norm(block: nn.Module) -> None:
    # Inverted-residual blocks (GLSP) normalise with BatchNorm straight into a 1x1 expansion:
    # one pass over the block's input saved (6 ms in rwkv_unet_t's first block at 512x512).
    norm, expand = getattr(block, "norm", None), getattr(block, "expand", None)
    if not (isinstance(norm, nn.BatchNorm2d) and norm.track_running_stats and isinstance(expand, nn.Sequential)):
        return
    conv = expand[0]
    if (type(conv) is nn.Conv2d and conv.kernel_size == (1, 1) and conv.stride == (1, 1)
            and conv.groups == 1 and conv.padding == (0, 0)):
        expand[0] = fold_bn_into_next_conv(norm, conv)
        block.norm = nn.Identity()


def _fuse_activations(seq: nn.Sequential) -> None:
    names = [name for name, module in seq._modules.items() if not isinstance(module, nn.Identity)]
    for first, second in zip(names, names[1:]):
        conv, act = seq._modules[first], seq._modules[second]
        if ConvAct.supports(conv, act):
            seq._modules[first] = ConvAct(conv, act)
            seq._modules[second] = nn.Identity()


class ConvAct(nn.Module):
    """``act(conv(x))`` for a ReLU or SiLU: one oneDNN call on the CPU (float32), so the
    activation is applied while the conv's output is in cache instead of in a second pass
    over a 10-100 MB map (rwkv_unet_t at 512x512: 25-40 ms of 830); elsewhere the conv, then
    the activation in place over its fresh output."""

    ONEDNN_NAMES = {nn.ReLU: "relu", nn.SiLU: "swish"}

    def __init__(self, conv: nn.Conv2d, act: nn.Module):
        super().__init__()
        if not self.supports(conv, act):
            raise ValueError(f"ConvAct takes a zero-padded Conv2d and a ReLU or SiLU, not {conv} and {act}")
        self.conv = conv
        self.act = type(act)(inplace=True)
        self._onednn_name = self.ONEDNN_NAMES[type(act)]

    @classmethod
    def supports(cls, conv: nn.Module, act: nn.Module) -> bool:
        return (type(conv) is nn.Conv2d and type(act) in cls.ONEDNN_NAMES
                and conv.padding_mode == "zeros" and not isinstance(conv.padding, str))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and x.dtype == torch.float32 and _onednn_conv_act_available():
            c = self.conv
            return torch.ops.mkldnn._convolution_pointwise(
                x, c.weight, c.bias, list(c.padding), list(c.stride), list(c.dilation), c.groups,
                self._onednn_name, [None], "")
        return self.act(self.conv(x))


@functools.cache
def _onednn_conv_act_available() -> bool:
    # A private op (what torch.compile's CPU backend emits), in builds with oneDNN since
    # PyTorch 2.0; checked once, on first use, on a tiny input so that another build falls
    # back cleanly.
    try:
        if not torch.backends.mkldnn.is_available():
            return False
        x, w = torch.randn(1, 2, 3, 3), torch.randn(2, 2, 1, 1)
        out = torch.ops.mkldnn._convolution_pointwise(x, w, None, [0, 0], [1, 1], [1, 1], 1, "relu", [None], "")
        return torch.allclose(out, F.relu(F.conv2d(x, w)), atol=1e-5)
    except (AttributeError, RuntimeError):
        return False


class TokenLinear(nn.Linear):
    """``nn.Linear`` that runs on (B, T, C) float32 CPU tokens as a 1x1 convolution.

    A contiguous (B, T, C) tensor is a channels_last (B, C, 1, T) image, so no copy is made,
    and oneDNN's 1x1 convolution beats the BLAS matmul by 5-15% on the RWKV projections
    (e.g. 4096 tokens, 288 -> 288 channels: 9.8 against 10.5 ms on 2 threads).  Anything
    else (other ranks, devices or dtypes) goes through ``F.linear``."""

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "TokenLinear":
        token = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        token.weight, token.bias = linear.weight, linear.bias
        return token

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (x.dim() == 3 and x.device.type == "cpu" and x.dtype == torch.float32 and x.is_contiguous()
                and torch.backends.mkldnn.is_available()):
            return F.linear(x, self.weight, self.bias)
        B, T, _ = x.shape
        image = x.view(B, 1, T, -1).permute(0, 3, 1, 2)
        out = F.conv2d(image, self.weight[:, :, None, None], self.bias)
        return out.permute(0, 2, 3, 1).reshape(B, T, -1)
