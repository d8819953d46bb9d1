"""The CUDA path of Bi-WKV: compiles ``kernels/bi_wkv.{cu,cpp}`` on first use.

Importing this module compiles nothing.  The first call with CUDA tensors builds the
extension for the GPU that is present (or loads it from the per-user cache), then
checks it against the PyTorch path on that device before trusting it: the kernel
ships without having run on every GPU, and a wrong gradient must never be silent.
Any failure -- no toolkit, a compiler error, a failed self-check -- makes
:func:`unavailable_reason` say why and how to fix it, and the dispatcher falls back
to the PyTorch path with one warning.
"""
import contextlib
import hashlib
import os
import threading
import warnings
from pathlib import Path

import torch

from ..._resources import kernels_dir
from .chunked import bi_wkv_chunked

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
NO_CUDA = "CUDA is not available to PyTorch on this machine."

_SOURCES = ("bi_wkv.cu", "bi_wkv.cpp")
_FIX = "set MEDRWKV_WKV=torch to use the PyTorch path without trying the kernel"
_SELF_CHECK_TOLERANCE = 1e-4
# (B, T, C, segments): one partial tile; several tiles in one launch; T split across
# blocks (as many as the GPU wants, and 3 forced); a single token.
_SELF_CHECK_CASES = ((2, 37, 45, 0), (1, 300, 45, 1), (1, 300, 45, 0), (1, 300, 45, 3), (3, 1, 45, 0))

_lock = threading.RLock()
_extensions = {}   # compute capability -> loaded extension
_checked = set()   # devices whose self-check passed
_failure = ""      # why the kernel is off for the rest of this process
_warned = False


class _Unavailable(Exception):
    pass


def unavailable_reason(device=None) -> str:
    """"" if the kernel can run on ``device`` (default: the current CUDA device), else why not and the fix.

    The first call for a device builds and self-checks the kernel; later calls are cheap.
    """
    if not torch.cuda.is_available():
        return NO_CUDA
    with _lock:
        if not _failure:
            _prepare(_device(device))
        return _failure


def available(device=None) -> bool:
    return not unavailable_reason(device)


def warn_unavailable(reason: str) -> None:
    """One warning per process that the PyTorch path replaces the kernel, naming the cause."""
    global _warned
    if _warned or not reason or reason == NO_CUDA:
        return
    _warned = True
    warnings.warn(f"Bi-WKV: the CUDA kernel is unavailable, the PyTorch path is used instead: {reason}",
                  RuntimeWarning, stacklevel=3)


def extension(device=None):
    """The built, self-checked extension module for ``device`` (its ``forward``/``backward`` take raw tensors)."""
    reason = unavailable_reason(device)
    if reason:
        raise RuntimeError(f"The CUDA Bi-WKV kernel is unavailable: {reason}")
    return _extensions[_capability(_device(device))]


def bi_wkv_cuda(w, u, k, v):
    """Bi-WKV with the compiled kernel: float32 arithmetic, output in the dtype of ``k``, differentiable."""
    if k.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"The CUDA Bi-WKV kernel computes float32, float16 and bfloat16 tensors, not {k.dtype}.")
    ext = extension(k.device)
    # Casts outside the Function, so that autograd carries the gradients back to the callers' dtypes.
    w, u = w.float().contiguous(), u.float().contiguous()
    k, v = k.contiguous(), v.to(k.dtype).contiguous()
    if torch.is_grad_enabled() and any(t.requires_grad for t in (w, u, k, v)):
        return _BiWKV.apply(ext, w, u, k, v)
    return ext.forward(w, u, k, v, False)[0]


class _BiWKV(torch.autograd.Function):
    """The kernel under autograd.  Autocast needs nothing here: the extension casts nothing and
    the dtypes are fixed by bi_wkv_cuda before the call."""

    @staticmethod
    def forward(ctx, ext, w, u, k, v):
        y, saved = ext.forward(w, u, k, v, True)
        ctx.ext = ext
        ctx.save_for_backward(w, u, k, v, saved)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy):
        w, u, k, v, saved = ctx.saved_tensors
        grads = ctx.ext.backward(w, u, k, v, gy.to(k.dtype).contiguous(), saved)
        return (None, *(g if needed else None for g, needed in zip(grads, ctx.needs_input_grad[1:])))


def _device(device) -> torch.device:
    device = torch.device("cuda") if device is None else torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _capability(device):
    return torch.cuda.get_device_capability(device)


def _prepare(device) -> None:
    """Builds and self-checks the kernel for ``device`` once; records the first failure."""
    global _failure
    try:
        ext = _extension_for(device)
    except _Unavailable as error:
        _failure = str(error)
        return
    if device in _checked:
        return
    error = _self_check(ext, device)
    if error:
        _failure = (f"the CUDA Bi-WKV kernel failed its self-check on {device} ({error}); please report this "
                    "with the output of `python -m torch.utils.collect_env`")
        warn_unavailable(_failure)
    else:
        _checked.add(device)


def _extension_for(device):
    missing = [name for name in _SOURCES if not (kernels_dir() / name).exists()]
    if missing:
        raise _Unavailable(f"the kernel sources {', '.join(missing)} are not in {kernels_dir()}; reinstall "
                           f"napari-medrwkv, or {_FIX}")
    capability = _capability(device)
    if capability not in _extensions:
        problem = _toolchain_problem()
        if problem:
            raise _Unavailable(problem)
        try:
            _extensions[capability] = _build(capability)
        except Exception as error:  # any compiler or loader failure means: use the PyTorch path
            raise _Unavailable(f"building the CUDA Bi-WKV kernel failed: {_first_lines(error)} -- check that the "
                               f"CUDA toolkit matches torch.version.cuda ({torch.version.cuda}), or {_FIX}") from error
    return _extensions[capability]


def _toolchain_problem() -> str:
    from torch.utils import cpp_extension
    home = cpp_extension.CUDA_HOME
    if home is None or not (Path(home) / "bin" / ("nvcc.exe" if os.name == "nt" else "nvcc")).exists():
        return (f"nvcc was not found (CUDA_HOME is unset and nvcc is not on PATH): install the CUDA toolkit matching "
                f"torch.version.cuda ({torch.version.cuda}) and set CUDA_HOME, or {_FIX}")
    if not cpp_extension.is_ninja_available():
        return f"the ninja build tool was not found: pip install ninja, or {_FIX}"
    return ""


def _build(capability):
    """Compiles the extension for this compute capability only, into a per-user cache keyed by
    everything that changes the binary; a second process building the same key waits on
    cpp_extension.load's lock file (FileBaton) in that directory and then loads the result."""
    from torch.utils import cpp_extension
    sources = [kernels_dir() / name for name in _SOURCES]
    digest = hashlib.sha256(b"".join(path.read_bytes() for path in sources)).hexdigest()[:16]
    arch = f"{capability[0]}.{capability[1]}"
    tag = f"sm{capability[0]}{capability[1]}_{digest}"
    build_dir = _cache_root() / f"torch{torch.__version__}-cuda{torch.version.cuda}-{tag}"
    build_dir.mkdir(parents=True, exist_ok=True)   # exist_ok: racing processes both succeed
    with _arch_list(arch):
        return cpp_extension.load(name=f"medrwkv_bi_wkv_{tag}", sources=[str(path) for path in sources],
                                  extra_cflags=["-O3"], extra_cuda_cflags=["-O3"],
                                  build_directory=str(build_dir), verbose=False)


def _cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "napari-medrwkv" / "bi_wkv"


@contextlib.contextmanager
def _arch_list(arch: str):
    """TORCH_CUDA_ARCH_LIST set to the present GPU only while cpp_extension.load reads it."""
    previous = os.environ.get("TORCH_CUDA_ARCH_LIST")
    os.environ["TORCH_CUDA_ARCH_LIST"] = arch
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("TORCH_CUDA_ARCH_LIST", None)
        else:
            os.environ["TORCH_CUDA_ARCH_LIST"] = previous


def _first_lines(error: Exception, count: int = 6) -> str:
    """The compiler's error lines (else the message's first lines), joined on one line."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower()]
    return " | ".join((errors or lines)[:count])


def _self_check(ext, device) -> str:
    """"" if the kernel matches the PyTorch path on ``device`` in float32, else what went wrong."""
    try:
        # The first call may come under inference_mode, no_grad or autocast; the reference needs none of them.
        with torch.inference_mode(False), torch.enable_grad(), torch.autocast(device.type, enabled=False):
            worst = max(_self_check_case(ext, device, *case) for case in _SELF_CHECK_CASES)
    except Exception as error:  # a kernel that raises must not take the caller down
        return f"{type(error).__name__}: {error}"
    if not worst <= _SELF_CHECK_TOLERANCE:
        return f"relative error {worst:.1e} against the PyTorch path, tolerance {_SELF_CHECK_TOLERANCE:.0e}"
    return ""


def _self_check_case(ext, device, B, T, C, segments) -> float:
    g = torch.Generator().manual_seed(T)
    w = (torch.rand(C, generator=g) * 8 - 5) / T      # decays as the models pass them
    u = torch.randn(C, generator=g) / T
    k, v, gy = (torch.randn(B, T, C, generator=g) for _ in range(3))
    w, u, k, v, gy = (t.to(device) for t in (w, u, k, v, gy))
    y, saved = ext.forward(w, u, k, v, True, segments)
    ours = [y, *ext.backward(w, u, k, v, gy, saved, segments)]
    leaves = [t.clone().requires_grad_() for t in (w, u, k, v)]
    ref = bi_wkv_chunked(*leaves)
    ref.backward(gy)
    reference = [ref.detach(), *(t.grad for t in leaves)]
    if T == 1:   # gw, gu, gk are 0 in exact arithmetic: both sides would be rounding noise
        ours, reference = ours[::4], reference[::4]
    return max(_relative_error(a, b) for a, b in zip(ours, reference))


def _relative_error(ours, reference) -> float:
    scale = float(reference.double().norm())
    error = float((ours.double() - reference.double()).norm())
    return error / scale if scale > 0 else error
