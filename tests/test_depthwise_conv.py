"""Depthwise convolution: the fast weight gradient against the float64 definition."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from napari_medrwkv.models.layers import DepthwiseConv2d, conv_bn_act
from napari_medrwkv.ops import depthwise_conv2d
from napari_medrwkv.ops.depthwise_conv import (_DepthwiseConv2d, depthwise_weight_grad_by_correlation,
                                               depthwise_weight_grad_naive, weight_grad_path)

# (B, C, H, W, kernel, stride, padding): odd and non-square sizes, strides 1-3, kernels
# wider than the image, rectangular kernels, no padding and more padding than k // 2.
CASES = [
    (1, 1, 1, 1, (1, 1), (1, 1), (0, 0)),
    (2, 3, 7, 5, (3, 3), (1, 1), (1, 1)),
    (1, 4, 9, 13, (5, 5), (2, 2), (2, 2)),
    (3, 2, 10, 8, (5, 5), (2, 2), (2, 2)),
    (2, 5, 11, 6, (9, 9), (1, 1), (4, 4)),
    (1, 3, 2, 3, (5, 5), (1, 1), (2, 2)),
    (2, 2, 12, 9, (3, 5), (1, 2), (1, 2)),
    (1, 2, 13, 13, (3, 3), (3, 3), (0, 0)),
    (2, 3, 8, 8, (3, 3), (1, 1), (3, 3)),
    (1, 2, 9, 7, (2, 2), (2, 2), (0, 0)),
]


def _inputs(B, C, H, W, kernel, stride, padding, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, H, W, generator=g, dtype=torch.float64)
    Ho = (H + 2 * padding[0] - kernel[0]) // stride[0] + 1
    Wo = (W + 2 * padding[1] - kernel[1]) // stride[1] + 1
    grad_out = torch.randn(B, C, Ho, Wo, generator=g, dtype=torch.float64)
    return grad_out.to(dtype), x.to(dtype)


@pytest.mark.parametrize("case", CASES)
def test_naive_is_the_gradient_autograd_computes(case):
    *shape, kernel, stride, padding = case
    grad_out, x = _inputs(*shape, kernel, stride, padding)
    weight = torch.randn(shape[1], 1, *kernel, dtype=torch.float64, requires_grad=True)
    F.conv2d(x, weight, None, stride, padding, 1, shape[1]).backward(grad_out)
    naive = depthwise_weight_grad_naive(grad_out, x, kernel, stride, padding)
    assert torch.allclose(naive, weight.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", CASES)
def test_correlation_is_exact_in_float64(case):
    *shape, kernel, stride, padding = case
    grad_out, x = _inputs(*shape, kernel, stride, padding, seed=1)
    got = depthwise_weight_grad_by_correlation(grad_out, x, kernel, stride, padding)
    assert got.dtype == torch.float64 and got.shape == (shape[1], 1, *kernel)
    assert torch.allclose(got, depthwise_weight_grad_naive(grad_out, x, kernel, stride, padding), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("case", CASES + [(4, 24, 64, 48, (5, 5), (2, 2), (2, 2)), (2, 16, 40, 40, (9, 9), (1, 1), (4, 4))])
def test_correlation_in_float32(case, channels_last):
    *shape, kernel, stride, padding = case
    grad_out, x = _inputs(*shape, kernel, stride, padding, dtype=torch.float32, seed=2)
    if channels_last:
        grad_out, x = (t.contiguous(memory_format=torch.channels_last) for t in (grad_out, x))
    got = depthwise_weight_grad_by_correlation(grad_out, x, kernel, stride, padding)
    ref = depthwise_weight_grad_naive(grad_out, x, kernel, stride, padding)
    assert float((got.double() - ref).norm() / ref.norm()) < 1e-5


def test_gradcheck_of_all_three_inputs():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 7, 6, dtype=torch.float64, generator=g, requires_grad=True)
    weight = torch.randn(3, 1, 3, 3, dtype=torch.float64, generator=g, requires_grad=True)
    bias = torch.randn(3, dtype=torch.float64, generator=g, requires_grad=True)
    for stride in ((1, 1), (2, 2)):
        assert torch.autograd.gradcheck(lambda *a: _DepthwiseConv2d.apply(*a, stride, (1, 1)), (x, weight, bias))


def test_path_choice():
    big, small = torch.empty(1, 8, 256, 256), torch.empty(1, 8, 128, 128)
    assert weight_grad_path(small, (1, 1)) == "correlation"
    assert weight_grad_path(big, (2, 2)) == "correlation"
    assert weight_grad_path(small, (2, 2)) == "pytorch"
    assert weight_grad_path(small.double(), (1, 1)) == "pytorch"      # float64 keeps PyTorch's own gradient


@pytest.mark.parametrize("size,stride", [(48, 1), (256, 2), (64, 2)])
def test_module_matches_a_plain_conv(size, stride):
    # Forward and every gradient as nn.Conv2d computes them, on channels_last input as in training.
    torch.manual_seed(0)
    fast = DepthwiseConv2d(6, 6, 5, stride, 2, groups=6, bias=True)
    plain = nn.Conv2d(6, 6, 5, stride, 2, groups=6, bias=True)
    plain.load_state_dict(fast.state_dict())
    x = torch.randn(2, 6, size, size).contiguous(memory_format=torch.channels_last)
    grads = []
    for conv in (fast, plain):
        xi = x.clone().requires_grad_()
        out = conv(xi)
        out.backward(torch.cos(out.detach()))
        grads.append((out.detach(), xi.grad, conv.weight.grad, conv.bias.grad))
    for got, ref in zip(*grads):
        assert float((got - ref).norm() / ref.norm()) < 1e-5


def test_module_takes_only_depthwise_convolutions():
    with pytest.raises(ValueError, match="groups == in == out"):
        DepthwiseConv2d(4, 8, 3, groups=4)
    assert type(conv_bn_act(8, 8, 3, groups=8)[0]) is DepthwiseConv2d
    assert type(conv_bn_act(8, 16, 1)[0]) is nn.Conv2d


def test_no_gradient_runs_the_plain_convolution():
    x, weight = torch.randn(1, 3, 9, 9), torch.randn(3, 1, 3, 3, requires_grad=True)
    with torch.no_grad():
        out = depthwise_conv2d(x, weight, None, 1, 1)
    assert out.grad_fn is None
    assert torch.equal(out, F.conv2d(x, weight, None, 1, 1, 1, 3))


def test_environment_forces_a_path(monkeypatch):
    small = torch.empty(1, 8, 64, 64)
    monkeypatch.setenv("MEDRWKV_DW_GRAD", "correlation")
    assert weight_grad_path(small, (2, 2)) == "correlation"
    monkeypatch.setenv("MEDRWKV_DW_GRAD", "pytorch")
    assert weight_grad_path(small, (1, 1)) == "pytorch"
    monkeypatch.setenv("MEDRWKV_DW_GRAD", "fast")
    with pytest.raises(ValueError, match="MEDRWKV_DW_GRAD='fast'"):
        weight_grad_path(small, (1, 1))


def test_cpu_autocast_keeps_pytorchs_own_gradient():
    # The convolution then runs in bfloat16 while x is float32: the weight gradient must still come back.
    conv = DepthwiseConv2d(4, 4, 3, 1, 1, groups=4, bias=False)
    x = torch.randn(2, 4, 16, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = conv(x)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert conv.weight.grad is not None and torch.isfinite(conv.weight.grad).all()
