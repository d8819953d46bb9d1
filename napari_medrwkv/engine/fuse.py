"""Inference-time graph surgery: fold BatchNorm into the convolution before it, and let
the activation after a convolution overwrite the convolution's fresh output."""
import copy

import torch
import torch.nn as nn


def fold_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """A conv equal to ``bn(conv(x))`` in eval mode."""
    fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                      conv.dilation, conv.groups, bias=True, padding_mode=conv.padding_mode)
    fused = fused.to(device=conv.weight.device, dtype=conv.weight.dtype)
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    with torch.no_grad():
        fused.weight.copy_(conv.weight * scale.view(-1, 1, 1, 1))
        fused.bias.copy_((bias - bn.running_mean) * scale + bn.bias)
    return fused


def fuse_for_inference(net: nn.Module) -> nn.Module:
    """An eval-mode copy of ``net`` with every Conv2d -> BatchNorm2d pair inside an
    ``nn.Sequential`` folded into one conv, and the ReLU/SiLU that follows such a conv
    in place.  ``net`` itself is left untouched.  The copy is for inference only: in
    place activations are safe there because nothing else holds the conv's output."""
    net = copy.deepcopy(net).eval()
    for module in net.modules():
        if isinstance(module, nn.Sequential):
            _fuse_sequential(module)
    return net


def _fuse_sequential(seq: nn.Sequential) -> None:
    names = list(seq._modules)
    for first, second in zip(names, names[1:]):
        conv, bn = seq._modules[first], seq._modules[second]
        if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d) and bn.track_running_stats:
            seq._modules[first] = fold_conv_bn(conv, bn)
            seq._modules[second] = nn.Identity()
    _activations_in_place(seq)


def _activations_in_place(seq: nn.Sequential) -> None:
    # A large activation map allocated afresh costs as much as the activation itself
    # (page faults on 25-50 MB buffers at 512x512).
    previous = None
    for module in seq:
        if isinstance(module, nn.Identity):
            continue
        if isinstance(module, (nn.ReLU, nn.SiLU)) and isinstance(previous, nn.Conv2d):
            module.inplace = True
        previous = module
