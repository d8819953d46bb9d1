"""Depthwise-convolution weight gradients on the CPU, and what they cost a training step.

    python bench/depthwise.py [--threads 2] [--batch 4] [--patch 256] [--repeats 5] [--steps 8]

First table: every depthwise layer of rwkv_unet_t at this batch and patch size, the weight
gradient by oneDNN (PyTorch's own) and by correlation (ops/depthwise_conv), and the path
the op picks.  Second: whole training steps (forward, backward, AdamW) of rwkv_unet_t with
``MEDRWKV_DW_GRAD`` forced to each path, in alternating rounds.
"""
import argparse
import os

import torch
import torch.nn.functional as F
from timing import interleaved_median_seconds, memory_setting

from napari_medrwkv.models import create_model
from napari_medrwkv.models.layers import DepthwiseConv2d
from napari_medrwkv.ops.depthwise_conv import depthwise_weight_grad_by_correlation, weight_grad_path


def depthwise_layer_inputs(net, x):
    """(conv, input shape) of every DepthwiseConv2d in one forward of ``net``."""
    seen = []
    hooks = [m.register_forward_hook(lambda m, inp, out: seen.append((m, tuple(inp[0].shape))))
             for m in net.modules() if isinstance(m, DepthwiseConv2d)]
    with torch.no_grad():
        net(x)
    for h in hooks:
        h.remove()
    return seen


def pytorch_weight_grad(grad_out, x, conv):
    return torch.ops.aten.convolution_backward(grad_out, x, conv.weight, None, list(conv.stride), list(conv.padding),
                                               [1, 1], False, [0, 0], conv.groups, [False, True, False])[1]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--patch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=8, help="alternating rounds of whole training steps (0: none)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    memory = memory_setting()
    torch.manual_seed(0)
    net = create_model("rwkv_unet_t").train().to(memory_format=torch.channels_last)
    x = torch.randn(args.batch, 3, args.patch, args.patch).contiguous(memory_format=torch.channels_last)

    print(f"Depthwise weight gradients, rwkv_unet_t, batch {args.batch}, {args.patch}px, CPU {args.threads} threads, "
          f"{memory}, median ms")
    print("| input (B, C, H, W) | kernel | stride | PyTorch (oneDNN) | correlation | speed-up | op picks |")
    print("|---|---|---|---|---|---|---|")
    total = {"pytorch": 0.0, "correlation": 0.0, "picked": 0.0}
    for conv, shape in depthwise_layer_inputs(net, x):
        inp = torch.randn(shape).contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            grad_out = torch.randn_like(F.conv2d(inp, conv.weight, None, conv.stride, conv.padding, 1, conv.groups))
            ms = {name: s * 1e3 for name, s in interleaved_median_seconds({
                "pytorch": lambda: pytorch_weight_grad(grad_out, inp, conv),
                "correlation": lambda: depthwise_weight_grad_by_correlation(grad_out, inp, conv.kernel_size,
                                                                            conv.stride, conv.padding),
            }, args.repeats).items()}
        picked = weight_grad_path(inp, conv.stride)
        total["pytorch"] += ms["pytorch"]
        total["correlation"] += ms["correlation"]
        total["picked"] += ms[picked]
        print(f"| {shape} | {conv.kernel_size[0]}x{conv.kernel_size[1]} | {conv.stride[0]} | {ms['pytorch']:.1f} | "
              f"{ms['correlation']:.1f} | {ms['pytorch'] / ms['correlation']:.2f}x | {picked} |")
    print(f"| all layers | | | {total['pytorch']:.1f} | {total['correlation']:.1f} | | picked: {total['picked']:.1f} |")

    y = (torch.rand(args.batch, 1, args.patch, args.patch) > 0.5).float()
    optimizer = torch.optim.AdamW(net.parameters(), 1e-4)

    def step(path):
        if path == "auto":
            os.environ.pop("MEDRWKV_DW_GRAD", None)
        else:
            os.environ["MEDRWKV_DW_GRAD"] = path
        optimizer.zero_grad()
        F.binary_cross_entropy_with_logits(net(x), y).backward()
        optimizer.step()
    if args.steps:
        seconds = interleaved_median_seconds({p: (lambda p=p: step(p)) for p in ("pytorch", "auto")}, args.steps)
        os.environ.pop("MEDRWKV_DW_GRAD", None)
        print()
        print(f"Training step (forward, backward, AdamW), median of {args.steps} alternating rounds")
        print("| depthwise weight gradient | seconds |")
        print("|---|---|")
        print(f"| oneDNN everywhere (PyTorch's own) | {seconds['pytorch']:.3f} |")
        print(f"| as the op picks | {seconds['auto']:.3f} ({1 - seconds['auto'] / seconds['pytorch']:.0%} less) |")


if __name__ == "__main__":
    main()
