"""The CUDA Bi-WKV kernel against the float64 reference, and the loader's fallbacks.

Tests marked ``cuda`` need a GPU and skip without one.  The loader and dispatcher
tests run anywhere: they fake CUDA (``torch.cuda.is_available`` and
``Tensor.is_cuda``) and the build step.
"""
import os
import subprocess
import sys
import warnings

import pytest
import torch

from napari_medrwkv.ops import bi_wkv
from napari_medrwkv.ops.bi_wkv import bi_wkv_chunked, bi_wkv_naive, bi_wkv_recurrent, selected_path
from napari_medrwkv.ops.bi_wkv import cuda as wkv_cuda

TOL = 1e-5


def gpu(test):
    return pytest.mark.cuda(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")(test))


def _inputs(B, T, C, w_times_T=5.0, k_max=None, seed=0, device="cuda"):
    """float32 inputs; decays uniform in +-w_times_T / T, keys N(0, 1) or uniform in +-k_max."""
    g = torch.Generator().manual_seed(seed)
    w = (torch.rand(C, generator=g, dtype=torch.float64) * 2 - 1) * w_times_T / T
    u = torch.randn(C, generator=g, dtype=torch.float64) * 0.5
    if k_max is None:
        k = torch.randn(B, T, C, generator=g, dtype=torch.float64)
    else:
        k = (torch.rand(B, T, C, generator=g, dtype=torch.float64) * 2 - 1) * k_max
    v = torch.randn(B, T, C, generator=g, dtype=torch.float64)
    return [t.float().to(device) for t in (w, u, k, v)]


def _reference(w, u, k, v, gy):
    """y, gw, gu, gk, gv in float64: the naive formula where it fits, else the chunked path in
    float64 (which test_bi_wkv.py holds to 1e-12 of the naive one)."""
    leaves = [t.detach().double().requires_grad_() for t in (w, u, k, v)]
    B, T, C = k.shape
    y = (bi_wkv_naive if B * T * T * C <= 2 ** 24 else bi_wkv_chunked)(*leaves)
    y.backward(gy.double())
    return [y.detach(), *(t.grad for t in leaves)]


def _kernel(w, u, k, v, gy):
    leaves = [t.detach().clone().requires_grad_() for t in (w, u, k, v)]
    y = wkv_cuda.bi_wkv_cuda(*leaves)
    y.backward(gy)
    return [y.detach(), *(t.grad for t in leaves)]


def _assert_matches(ours, reference, tol=TOL, T=None):
    # At T = 1, gw, gu and gk are 0 exactly: measure their rounding noise against gv's scale.
    floor = float(reference[4].norm()) if T == 1 else 0.0
    for name, a, b in zip(("y", "gw", "gu", "gk", "gv"), ours, reference):
        assert torch.isfinite(a).all(), f"{name} is not finite"
        error = float((a.double() - b).norm())
        scale = max(float(b.norm()), floor if name in ("gw", "gu", "gk") else 0.0)
        assert error <= tol * scale, f"{name}: relative error {error / scale:.2e}"


@gpu
@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("C", [1, 45, 288])
@pytest.mark.parametrize("T", [1, 2, 31, 33, 1000, 16384])
def test_kernel_matches_float64_reference(T, C, B):
    w, u, k, v = _inputs(B, T, C, seed=T + C)
    gy = torch.randn_like(k)
    _assert_matches(_kernel(w, u, k, v, gy), _reference(w, u, k, v, gy), T=T)


@gpu
@pytest.mark.parametrize("T", [1000, 16384])
@pytest.mark.parametrize("w_times_T", [-30.0, 30.0])
def test_strong_decay_and_large_keys(T, w_times_T):
    w, u, k, v = _inputs(2, T, 45, w_times_T=w_times_T, k_max=50.0, seed=1)
    gy = torch.randn_like(k)
    _assert_matches(_kernel(w, u, k, v, gy), _reference(w, u, k, v, gy))


@gpu
@pytest.mark.parametrize("w_per_token", [-10.0, 10.0])
def test_any_decay_and_key_range_stays_finite(w_per_token):
    # Far outside what the models pass: e^{10 T} and e^{1000} overflow any direct evaluation.
    w, u, k, v = _inputs(2, 50, 45, seed=2)
    w = torch.full_like(w, w_per_token) * torch.linspace(0.1, 1.0, 45, device=w.device)
    k = k * 1000.0
    gy = torch.randn_like(k)
    ours, reference = _kernel(w, u, k, v, gy), _reference(w, u, k, v, gy)
    assert all(torch.isfinite(t).all() for t in ours)
    assert float((ours[0].double() - reference[0]).norm() / reference[0].norm()) < TOL
    assert float((ours[4].double() - reference[4]).norm() / reference[4].norm()) < 1e-4


@gpu
@pytest.mark.parametrize("segments", [1, 2, 5, 16])
def test_every_split_of_T_gives_the_same_answer(segments):
    # One launch for the whole sequence, or T split across blocks: forced here, chosen by the GPU otherwise.
    w, u, k, v = _inputs(2, 1000, 45, seed=3)
    gy = torch.randn_like(k)
    ext = wkv_cuda.extension()
    y, saved = ext.forward(w, u, k, v, True, segments)
    ours = [y, *ext.backward(w, u, k, v, gy, saved, segments)]
    _assert_matches(ours, _reference(w, u, k, v, gy))


@gpu
def test_non_contiguous_inputs():
    w, u, k, v = _inputs(3, 40, 45, seed=4)
    gy = torch.randn_like(k)
    w_base = torch.stack([w, w], dim=1).requires_grad_()          # w = w_base[:, 0], stride 2
    u_leaf = u.clone().requires_grad_()
    k_base = k.transpose(0, 1).contiguous().requires_grad_()      # k = k_base.transpose(0, 1)
    v_base = torch.stack([v, v], dim=3).requires_grad_()          # v = v_base[..., 0]
    views = (w_base[:, 0], u_leaf, k_base.transpose(0, 1), v_base[..., 0])
    assert not any(views[i].is_contiguous() for i in (0, 2, 3))
    y = wkv_cuda.bi_wkv_cuda(*views)
    y.backward(gy)
    ours = [y.detach(), w_base.grad[:, 0], u_leaf.grad, k_base.grad.transpose(0, 1), v_base.grad[..., 0]]
    _assert_matches(ours, _reference(w, u, k, v, gy))


@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_compute_in_float32(dtype):
    w, u, k, v = _inputs(2, 129, 45, w_times_T=3.0, seed=5)
    k, v = k.to(dtype), v.to(dtype)
    gy = torch.randn_like(k)
    ours = _kernel(w, u, k, v, gy)
    assert [t.dtype for t in ours] == [dtype, torch.float32, torch.float32, dtype, dtype]
    # Exact for the rounded inputs; only the rounding of the outputs to `dtype` remains.
    tol = 4e-3 if dtype == torch.float16 else 2e-2
    for a, b in zip(ours, _reference(w, u, k, v, gy)):
        assert float((a.double() - b).norm() / b.norm()) < tol


@gpu
def test_two_streams_at_once():
    first, second = _inputs(4, 3000, 288, seed=6), _inputs(4, 3000, 288, seed=7)
    expected = [wkv_cuda.bi_wkv_cuda(*x) for x in (first, second)]
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    torch.cuda.synchronize()
    results = []
    for stream, x in zip(streams, (first, second)):
        with torch.cuda.stream(stream):
            results.append(wkv_cuda.bi_wkv_cuda(*x))
    torch.cuda.synchronize()
    for got, want in zip(results, expected):
        assert torch.equal(got, want)


@gpu
def test_autocast_and_inference_mode():
    w, u, k, v = _inputs(2, 200, 45, seed=8)
    expected = wkv_cuda.bi_wkv_cuda(w, u, k, v)
    leaves = [t.clone().requires_grad_() for t in (w, u, k, v)]
    with torch.autocast("cuda", dtype=torch.float16):
        y = bi_wkv(*leaves)
    assert y.dtype == torch.float32 and torch.equal(y.detach(), expected)
    y.sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in leaves)
    with torch.inference_mode():
        y = bi_wkv(*leaves)
    assert not y.requires_grad and torch.equal(y, expected)


@gpu
def test_dispatcher_picks_the_kernel_for_cuda_tensors(monkeypatch):
    monkeypatch.delenv("MEDRWKV_WKV", raising=False)
    k = torch.zeros(1, 2, 3, device="cuda")
    assert wkv_cuda.unavailable_reason() == ""
    assert selected_path(k) == "cuda"
    assert selected_path(k.double()) == "torch"
    monkeypatch.setenv("MEDRWKV_WKV", "cuda")
    with pytest.raises(RuntimeError, match="float64"):
        bi_wkv(torch.zeros(3, device="cuda"), torch.zeros(3, device="cuda"), k.double(), k.double())


# Everywhere: the loader's explanations and the fallback, with CUDA faked.

def test_unavailable_reason_explains_missing_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert wkv_cuda.unavailable_reason() == wkv_cuda.NO_CUDA
    assert not wkv_cuda.available()
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        wkv_cuda.bi_wkv_cuda(*_inputs(1, 3, 2, device="cpu"))


def test_importing_builds_nothing():
    code = ("import sys, torch.utils.cpp_extension as ce\n"
            "ce.load = lambda *a, **k: sys.exit('cpp_extension.load was called')\n"
            "from napari_medrwkv.ops.bi_wkv import cuda as c\n"
            "assert not c._extensions and not c._failure\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_build_compiles_for_the_present_gpu_into_a_keyed_cache(monkeypatch, tmp_path):
    import torch.utils.cpp_extension as cpp_extension
    seen = {}

    def fake_load(**kwargs):
        seen.update(kwargs, arch_list=os.environ.get("TORCH_CUDA_ARCH_LIST"))
        return "module"
    monkeypatch.setattr(cpp_extension, "load", fake_load)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "5.0;6.0")
    assert wkv_cuda._build((8, 6)) == "module"
    assert seen["arch_list"] == "8.6" and os.environ["TORCH_CUDA_ARCH_LIST"] == "5.0;6.0"
    assert [os.path.basename(f) for f in seen["sources"]] == ["bi_wkv.cu", "bi_wkv.cpp"]
    assert seen["name"].isidentifier() and "sm86" in seen["name"]
    build_dir = seen["build_directory"]
    assert build_dir.startswith(str(tmp_path)) and os.path.isdir(build_dir)
    assert torch.__version__ in build_dir and f"cuda{torch.version.cuda}" in build_dir and "sm86" in build_dir
    assert "--use_fast_math" not in seen["extra_cuda_cflags"]


@pytest.fixture
def fake_cuda(monkeypatch):
    """CPU tensors that claim to be on CUDA, a loader with no state, and the ordinary PyTorch path."""
    monkeypatch.delenv("MEDRWKV_WKV", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    monkeypatch.setattr(wkv_cuda, "_capability", lambda device: (9, 0))
    for name, value in (("_extensions", {}), ("_checked", set()), ("_failure", ""), ("_warned", False)):
        monkeypatch.setattr(wkv_cuda, name, value)


def _warnings_and_results(calls, *args):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = [bi_wkv(*args) for _ in range(calls)]
    return [str(w.message) for w in caught], results


def test_build_failure_warns_once_and_uses_the_torch_path(fake_cuda, monkeypatch):
    def failing_build(capability):
        raise RuntimeError("Error building extension 'medrwkv_bi_wkv':\nbi_wkv.cu(7): error: fake compiler failure")
    monkeypatch.setattr(wkv_cuda, "_toolchain_problem", lambda: "")
    monkeypatch.setattr(wkv_cuda, "_build", failing_build)
    args = _inputs(2, 20, 3, device="cpu")
    messages, results = _warnings_and_results(3, *args)
    assert len(messages) == 1
    assert "fake compiler failure" in messages[0] and "MEDRWKV_WKV=torch" in messages[0]
    expected = bi_wkv_recurrent(*args)   # the PyTorch path without gradients
    assert all(torch.equal(y, expected) for y in results)
    monkeypatch.setenv("MEDRWKV_WKV", "cuda")
    with pytest.raises(RuntimeError, match="fake compiler failure"):
        bi_wkv(*args)


def test_missing_toolkit_names_the_fix(fake_cuda, monkeypatch):
    import torch.utils.cpp_extension as cpp_extension
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", None)
    monkeypatch.setattr(wkv_cuda, "_build", lambda capability: pytest.fail("built without a toolkit"))
    messages, _ = _warnings_and_results(2, *_inputs(1, 5, 3, device="cpu"))
    assert len(messages) == 1
    assert "install the CUDA toolkit matching torch.version.cuda" in messages[0] and "MEDRWKV_WKV=torch" in messages[0]


def test_missing_sources_name_the_fix(fake_cuda, monkeypatch, tmp_path):
    monkeypatch.setattr(wkv_cuda, "kernels_dir", lambda: tmp_path)
    assert "bi_wkv.cu, bi_wkv.cpp are not in" in wkv_cuda.unavailable_reason("cpu")


class _WrongKernel:
    @staticmethod
    def forward(w, u, k, v, save, segments=0):
        return torch.zeros_like(k), None

    @staticmethod
    def backward(w, u, k, v, gy, saved, segments=0):
        return torch.zeros_like(w), torch.zeros_like(u), torch.zeros_like(k), torch.zeros_like(v)


class _CrashingKernel(_WrongKernel):
    @staticmethod
    def forward(w, u, k, v, save, segments=0):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")


@pytest.mark.parametrize("kernel, cause",
                         [(_WrongKernel, "relative error"), (_CrashingKernel, "illegal memory access")])
def test_failed_self_check_warns_once_and_uses_the_torch_path(fake_cuda, monkeypatch, kernel, cause):
    monkeypatch.setattr(wkv_cuda, "_toolchain_problem", lambda: "")
    monkeypatch.setattr(wkv_cuda, "_build", lambda capability: kernel)
    args = _inputs(2, 20, 3, device="cpu")
    messages, results = _warnings_and_results(2, *args)
    assert len(messages) == 1 and "failed its self-check" in messages[0] and cause in messages[0]
    assert all(torch.equal(y, bi_wkv_recurrent(*args)) for y in results)
    assert not wkv_cuda.available()
