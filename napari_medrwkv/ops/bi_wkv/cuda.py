"""The CUDA path of Bi-WKV: builds ``kernels/`` on first use.

The kernel sources are the subject of their own issue (exact, any T, near the
bandwidth floor).  Until they ship, this module reports itself unavailable and
the dispatcher uses the PyTorch path.
"""
from .._resources import kernels_dir

_SOURCES = ("bi_wkv.cu", "bi_wkv.cpp")


def unavailable_reason() -> str:
    if not __import__("torch").cuda.is_available():
        return "CUDA is not available to PyTorch on this machine."
    missing = [name for name in _SOURCES if not (kernels_dir() / name).exists()]
    if missing:
        return (f"the kernel sources {', '.join(missing)} are not in {kernels_dir()}; "
                "this version ships only the PyTorch path (set MEDRWKV_WKV=torch or unset it).")
    return ""


def available() -> bool:
    return not unavailable_reason()


def bi_wkv_cuda(w, u, k, v):
    raise RuntimeError(f"The CUDA Bi-WKV kernel is unavailable: {unavailable_reason()}")
