"""Bi-WKV, the bidirectional WKV attention of Vision-RWKV.

``bi_wkv(w, u, k, v)`` picks a path per call:

* ``cuda``  -- the compiled kernel from ``kernels/`` for float32/float16/bfloat16
  CUDA tensors, when it can be built on this machine and passes its self-check;
* ``torch`` -- pure PyTorch, any device and dtype: :func:`bi_wkv_recurrent`
  (forward only, the faster) when no gradient is needed, else :func:`bi_wkv_chunked`.

``MEDRWKV_WKV=torch|cuda`` forces one.  Without it, a kernel that cannot be used
on a CUDA tensor (no toolkit, build error, failed self-check) costs one warning
naming the cause and the fix, and the PyTorch path runs instead.
:func:`bi_wkv_naive` is the O(T^2) float64 reference the tests compare every
path with.
"""
import os

import torch

from .chunked import bi_wkv_chunked
from .recurrent import bi_wkv_recurrent
from .naive import bi_wkv_naive

__all__ = ["bi_wkv", "bi_wkv_chunked", "bi_wkv_naive", "bi_wkv_recurrent", "selected_path"]

_PATHS = ("torch", "cuda")


def selected_path(k: torch.Tensor) -> str:
    """The path :func:`bi_wkv` takes for a tensor like ``k``."""
    forced = os.environ.get("MEDRWKV_WKV", "").strip().lower()
    if forced and forced not in _PATHS:
        raise ValueError(f"MEDRWKV_WKV={forced!r}: use one of {', '.join(_PATHS)} (or unset it).")
    if forced == "torch":
        return "torch"
    if k.is_cuda:
        from . import cuda
        if k.dtype not in cuda.SUPPORTED_DTYPES:
            if forced == "cuda":
                raise RuntimeError(f"MEDRWKV_WKV=cuda but the CUDA Bi-WKV kernel computes float32, float16 and "
                                   f"bfloat16 tensors, not {k.dtype}")
            return "torch"
        reason = cuda.unavailable_reason(k.device)
        if not reason:
            return "cuda"
        if forced == "cuda":
            raise RuntimeError(f"MEDRWKV_WKV=cuda but the CUDA Bi-WKV kernel is unavailable: {reason}")
        cuda.warn_unavailable(reason)
        return "torch"
    if forced == "cuda":
        raise RuntimeError("MEDRWKV_WKV=cuda needs CUDA tensors; these are on " + str(k.device))
    return "torch"


def bi_wkv(w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Bidirectional WKV (Vision-RWKV, exact formula).

    ``w``, ``u``: (C,), already divided by T as the models pass them;
    ``k``, ``v``: (B, T, C).  Returns (B, T, C) in the dtype of ``k``::

        wkv_t = (sum_{i!=t} e^{-(|t-i|-1) w + k_i} v_i + e^{u + k_t} v_t)
              / (sum_{i!=t} e^{-(|t-i|-1) w + k_i}     + e^{u + k_t})
    """
    _check(w, u, k, v)
    if selected_path(k) == "cuda":
        from . import cuda
        return cuda.bi_wkv_cuda(w, u, k, v)
    # The PyTorch paths choose their own precision (float32 inside); under autocast their
    # convolutions would otherwise run in bfloat16/float16 and their backward mix dtypes.
    with torch.autocast(k.device.type, enabled=False):
        if torch.is_grad_enabled() and any(t.requires_grad for t in (w, u, k, v)):
            return bi_wkv_chunked(w, u, k, v)
        return bi_wkv_recurrent(w, u, k, v)


def _check(w, u, k, v):
    if k.dim() != 3 or v.shape != k.shape:
        raise ValueError(f"bi_wkv: k and v must both be (B, T, C); got k {tuple(k.shape)}, v {tuple(v.shape)}")
    C = k.shape[2]
    if w.shape != (C,) or u.shape != (C,):
        raise ValueError(f"bi_wkv: w and u must be ({C},) to match k; got w {tuple(w.shape)}, u {tuple(u.shape)}")
    if k.shape[1] < 1:
        raise ValueError("bi_wkv: T must be at least 1")
