"""Bi-WKV: every path against the O(T^2) float64 reference."""
import pytest
import torch

from napari_medrwkv.ops import bi_wkv
from napari_medrwkv.ops.bi_wkv import bi_wkv_chunked, bi_wkv_naive, bi_wkv_recurrent, selected_path
from napari_medrwkv.ops.bi_wkv.carries import carries, carries_in_range

# Every fast PyTorch path: the differentiable convolution one and the forward-only recurrence.
PATHS = [pytest.param(bi_wkv_chunked, id="chunked"), pytest.param(bi_wkv_recurrent, id="recurrent")]


def _inputs(B, T, C, w_scale=1.0, k_scale=1.0, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(C, generator=g, dtype=torch.float64) * w_scale
    u = torch.randn(C, generator=g, dtype=torch.float64)
    k = torch.randn(B, T, C, generator=g, dtype=torch.float64) * k_scale
    v = torch.randn(B, T, C, generator=g, dtype=torch.float64)
    return [t.to(dtype) for t in (w, u, k, v)]


def _rel_err(out, ref):
    return float((out.detach().double() - ref).norm() / ref.norm())


def test_naive_matches_the_formula_written_out():
    # The reference itself, against a literal double loop over the paper's formula.
    w, u, k, v = _inputs(2, 7, 3, dtype=torch.float64)
    ref = bi_wkv_naive(w, u, k, v)
    for b in range(2):
        for t in range(7):
            for c in range(3):
                num = torch.exp(u[c] + k[b, t, c]) * v[b, t, c]
                den = torch.exp(u[c] + k[b, t, c])
                for i in range(7):
                    if i != t:
                        weight = torch.exp(-(abs(t - i) - 1) * w[c] + k[b, i, c])
                        num, den = num + weight * v[b, i, c], den + weight
                assert torch.allclose(ref[b, t, c], num / den, rtol=1e-12, atol=0)


SHAPES = [(1, 1, 4), (2, 2, 3), (1, 31, 5), (2, 33, 7), (3, 100, 17), (1, 257, 9), (2, 1000, 3)]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("B,T,C", SHAPES)
def test_float64_is_exact(path, B, T, C):
    w, u, k, v = _inputs(B, T, C, dtype=torch.float64, seed=T)
    assert _rel_err(path(w, u, k, v), bi_wkv_naive(w, u, k, v)) < 1e-12


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("B,T,C", SHAPES)
def test_float32(path, B, T, C):
    w, u, k, v = _inputs(B, T, C, w_scale=5.0 / T, seed=T)
    out = path(w, u, k, v)
    assert out.dtype == torch.float32
    assert _rel_err(out, bi_wkv_naive(w, u, k, v)) < 1e-5


@pytest.mark.parametrize("B,T,C", SHAPES)
def test_chunked_with_autograd_is_exact(B, T, C):
    w, u, k, v = _inputs(B, T, C, dtype=torch.float64, seed=T)
    out = bi_wkv_chunked(w, u, k.clone().requires_grad_(), v)
    assert out.requires_grad and _rel_err(out, bi_wkv_naive(w, u, k, v)) < 1e-12


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 16, 64])
def test_every_chunk_length_gives_the_same_answer(path, chunk):
    w, u, k, v = _inputs(2, 77, 6, dtype=torch.float64)
    assert _rel_err(path(w, u, k, v, chunk=chunk), bi_wkv_naive(w, u, k, v)) < 1e-12


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("w_times_T", [-30.0, -8.0, 8.0, 30.0, 100.0])
def test_large_decay_float32(path, w_times_T):
    T = 600
    w, u, k, v = _inputs(1, T, 8, seed=1)
    w = torch.full_like(w, w_times_T / T) * torch.linspace(0.2, 1.0, 8)
    assert _rel_err(path(w, u, k, v), bi_wkv_naive(w, u, k, v)) < 1e-5


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("k_scale", [20.0, 100.0, 1000.0])
def test_large_keys_stay_finite_and_exact(path, k_scale):
    # Exponents far outside float32's range: the running references must absorb them.
    w, u, k, v = _inputs(2, 300, 5, w_scale=0.05, k_scale=k_scale, seed=2)
    out = path(w, u, k, v)
    assert torch.isfinite(out).all()
    assert _rel_err(out, bi_wkv_naive(w, u, k, v)) < 1e-5


@pytest.mark.parametrize("path", PATHS)
def test_per_token_decay_larger_than_a_chunk_can_hold(path):
    # |w| = 5 per token: the chunk length must shrink so e^{|w| L} stays finite.
    w, u, k, v = _inputs(1, 50, 4, seed=3)
    w = torch.tensor([5.0, -5.0, 0.5, -0.01])
    assert _rel_err(path(w, u, k, v), bi_wkv_naive(w, u, k, v)) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("path", PATHS + [pytest.param(bi_wkv, id="dispatcher")])
def test_half_inputs_compute_in_float32(path, dtype):
    w, u, k, v = _inputs(2, 129, 8, w_scale=0.02, dtype=dtype, seed=4)
    out = path(w, u, k, v)
    assert out.dtype == dtype
    # Exact for the rounded inputs; only the output rounding remains.
    tol = 4e-3 if dtype == torch.float16 else 2e-2
    assert _rel_err(out, bi_wkv_naive(w, u, k, v)) < tol


@pytest.mark.parametrize("path", PATHS)
def test_non_contiguous_inputs(path):
    w, u, k, v = _inputs(3, 40, 6, dtype=torch.float64)
    kt, vt = k.transpose(0, 1).contiguous().transpose(0, 1), v[:, :, :].flip(0).flip(0)
    assert not kt.is_contiguous()
    assert _rel_err(path(w, u, kt, vt), bi_wkv_naive(w, u, k, v)) < 1e-12


def _chunk_summaries(m_scale, w, seed, B=2, n=37, C=6, L=16):
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(B, n, C, generator=g, dtype=torch.float64) * m_scale
    den = torch.rand(2, B, n, C, generator=g, dtype=torch.float64) * 3 + 0.1
    num = den * (torch.rand(2, B, n, C, generator=g, dtype=torch.float64) * 2 - 1)   # |num| <= den, as for |v| <= 1
    return m, torch.stack([num[0], den[0]]), torch.stack([num[1], den[1]]), w, L


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("m_scale,w_scale", [(0.0, 0.0), (1.0, 0.01), (2.0, 0.05), (2.0, -0.05)])
def test_carries_in_range_equal_the_log_space_carries(dtype, m_scale, w_scale):
    m, left, right, w, L = _chunk_summaries(m_scale, torch.linspace(-1, 1, 6, dtype=torch.float64) * w_scale, seed=7)
    expected_left, expected_right, shift = carries(m, left, right, w, L)
    assert not (shift > 0).any()
    got = carries_in_range(*(t.to(dtype) for t in (m, left, right, w)), L)
    assert got is not None
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    for out, ref in zip(got, (expected_left, expected_right)):
        assert out.dtype == dtype
        assert torch.allclose(out.double(), ref.double(), rtol=tol, atol=tol * float(ref.abs().max()))
    assert (got[0][:, :, 0] == 0).all() and (got[1][:, :, -1] == 0).all()    # nothing enters from outside


@pytest.mark.parametrize("m_scale,w_scale", [(30.0, 0.0), (0.0, 0.5), (15.0, -0.2)])
def test_carries_in_range_decline_where_log_space_is_needed(m_scale, w_scale):
    # Chunk scales far apart: plain scaling would under- or overflow, so it must hand over.
    m, left, right, w, L = _chunk_summaries(m_scale, torch.full((6,), w_scale, dtype=torch.float64), seed=8)
    assert carries_in_range(*(t.float() for t in (m, left, right, w)), L) is None
    # and the recurrent path, which then takes the log-space carries, stays exact
    x = _inputs(1, 16 * 37, 6, w_scale=0.0, seed=9, dtype=torch.float64)
    x[0] = torch.full((6,), w_scale, dtype=torch.float64)
    x[2] = x[2] + m.repeat_interleave(16, 1)[:1]
    assert _rel_err(bi_wkv_recurrent(*(t.float() for t in x)), bi_wkv_naive(*x)) < 1e-5


@pytest.mark.parametrize("T", [1, 3, 20, 41])
def test_gradcheck_all_four_inputs(T):
    w, u, k, v = _inputs(2, T, 3, dtype=torch.float64, seed=T)
    w = w * 0.3
    args = [t.clone().requires_grad_() for t in (w, u, k, v)]
    assert torch.autograd.gradcheck(lambda *a: bi_wkv_chunked(*a, chunk=8), args, eps=1e-6, atol=1e-7)


def test_gradients_match_the_reference_in_float32():
    w, u, k, v = _inputs(2, 200, 6, w_scale=0.02, seed=5)
    gy = torch.randn(2, 200, 6, dtype=torch.float64)
    grads = []
    for fn, dtype in ((bi_wkv_chunked, torch.float32), (bi_wkv_naive, torch.float64)):
        args = [t.detach().to(dtype).requires_grad_() for t in (w, u, k, v)]
        (fn(*args).double() * gy).sum().backward()
        grads.append([a.grad.double() for a in args])
    for ours, ref in zip(*grads):
        assert _rel_err(ours, ref) < 1e-4


def test_under_autocast_the_torch_path_stays_float32_and_differentiable():
    """Mixed-precision training (nm.train on a GPU) calls bi_wkv inside autocast with bfloat16
    k, v: the result must keep float32 accuracy and the backward must run.  CPU autocast
    stands in for CUDA's here."""
    w, u, k, v = _inputs(2, 150, 8, w_scale=0.02, seed=6)
    ref = bi_wkv_naive(w, u, k, v)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = bi_wkv(w, u, k, v)
    assert out.dtype == torch.float32 and _rel_err(out, ref) < 1e-5
    args = [t.to(torch.bfloat16).requires_grad_() if t.dim() == 3 else t.clone().requires_grad_() for t in (w, u, k, v)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = bi_wkv(*args)
    out.float().square().sum().backward()
    for a in args:
        assert a.grad is not None and a.grad.dtype == a.dtype and torch.isfinite(a.grad.float()).all()


def test_dispatcher_uses_torch_on_cpu_and_honours_the_variable(monkeypatch):
    k = torch.zeros(1, 2, 3)
    monkeypatch.delenv("MEDRWKV_WKV", raising=False)
    assert selected_path(k) == "torch"
    monkeypatch.setenv("MEDRWKV_WKV", "torch")
    assert selected_path(k) == "torch"
    monkeypatch.setenv("MEDRWKV_WKV", "cuda")
    with pytest.raises(RuntimeError, match="MEDRWKV_WKV=cuda"):
        bi_wkv(torch.zeros(3), torch.zeros(3), k, k)
    monkeypatch.setenv("MEDRWKV_WKV", "triton")
    with pytest.raises(ValueError, match="MEDRWKV_WKV"):
        bi_wkv(torch.zeros(3), torch.zeros(3), k, k)


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match=r"w and u must be \(3,\)"):
        bi_wkv(torch.zeros(4), torch.zeros(3), torch.zeros(1, 2, 3), torch.zeros(1, 2, 3))
    with pytest.raises(ValueError, match="k and v must both be"):
        bi_wkv(torch.zeros(3), torch.zeros(3), torch.zeros(2, 3), torch.zeros(2, 3))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_torch_path_on_cuda_tensors():
    w, u, k, v = _inputs(2, 500, 33, w_scale=0.01)
    out = bi_wkv_chunked(*(t.cuda() for t in (w, u, k, v)))
    assert _rel_err(out.cpu(), bi_wkv_naive(w, u, k, v)) < 1e-5


def test_dispatcher_runs_the_recurrent_path_unless_gradients_are_needed():
    w, u, k, v = _inputs(2, 50, 4, dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(bi_wkv(w, u, k, v), bi_wkv_recurrent(w, u, k, v))
    out = bi_wkv(w, u, k.clone().requires_grad_(), v)
    assert out.grad_fn is not None and _rel_err(out, bi_wkv_naive(w, u, k, v)) < 1e-12
