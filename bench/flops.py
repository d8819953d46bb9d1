"""FLOP counting for the segmentation models.

``count_flops(model, shape)`` returns FLOPs (2 x multiply-adds) of one eval-mode
forward pass under ``torch.no_grad``:

* matmul / linear / conv / bmm ... as ``torch.utils.flop_counter.FlopCounterMode``
  counts them (elementwise ops, norms, pooling and interpolation are free);
* plus Bi-WKV analytically, ``10 * B * T * C`` FLOPs per call.  While counting,
  Bi-WKV is replaced by a shape-only stand-in, so its internal convolutions
  (the chunked PyTorch path) are not counted twice and it costs no time.

The pass first runs on a ``meta`` copy of the model (no memory, no compute);
models whose forward needs real values fall back to a real pass on the model's
own device.

    python bench/flops.py            # prints ds_vrwkv_t and rwkv_unet_t at 512x512
"""
import contextlib
import copy
import importlib
import os
import sys

import torch
from torch.utils.flop_counter import FlopCounterMode

WKV_FLOPS_PER_TOKEN_CHANNEL = 10


def _import_package():
    try:
        return importlib.import_module("napari_medrwkv")
    except ImportError:
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        return importlib.import_module("napari_medrwkv")


@contextlib.contextmanager
def _counted_bi_wkv(tally):
    """Route every ``bi_wkv`` call to a stand-in that adds its analytic FLOPs to ``tally``."""
    _import_package()
    ops = importlib.import_module("napari_medrwkv.ops.bi_wkv")   # the package, not the function

    def stand_in(w, u, k, v, *args, **kwargs):
        B, T, C = k.shape
        tally[0] += WKV_FLOPS_PER_TOKEN_CHANNEL * B * T * C
        return v.clone()

    saved = ops.bi_wkv_chunked, ops.selected_path
    ops.bi_wkv_chunked, ops.selected_path = stand_in, (lambda k: "torch")
    try:
        yield
    finally:
        ops.bi_wkv_chunked, ops.selected_path = saved


def _run(model, x):
    tally = [0]
    with _counted_bi_wkv(tally), torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return int(counter.get_total_flops()) + int(tally[0])


def count_flops(model: torch.nn.Module, shape=(1, 3, 512, 512)) -> int:
    """FLOPs (2 x MACs) of ``model(torch.zeros(shape))`` in eval mode, as an int."""
    was_training = model.training
    model.eval()
    try:
        try:
            meta_model = copy.deepcopy(model).to("meta")
            return _run(meta_model, torch.zeros(shape, device="meta"))
        except (NotImplementedError, RuntimeError, TypeError, ValueError):
            pass                                   # forward needs real data: run it for real
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        return _run(model, torch.zeros(shape, device=device))
    finally:
        model.train(was_training)


if __name__ == "__main__":
    _import_package()
    from napari_medrwkv.models import create_model

    for name in ("ds_vrwkv_t", "rwkv_unet_t"):
        m = create_model(name, in_chans=3, num_classes=1)
        n_params = sum(p.numel() for p in m.parameters())
        flops = count_flops(m, (1, 3, 512, 512))
        print(f"{name}: {n_params / 1e6:.3f} M params, {flops / 1e9:.2f} GFLOPs "
              f"({flops / 2e9:.2f} GMACs) at 1x3x512x512")
