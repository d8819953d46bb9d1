"""Properties every registered segmentation model must have."""
import pytest
import torch

from napari_medrwkv.models import create_model, list_models

SMALL = [name for name in list_models() if name.endswith("_t")]


def test_registry_lists_the_three_families():
    names = list_models()
    for expected in ("rwkv_unet_t", "rwkv_unet_s", "rwkv_unet_b"):
        assert expected in names
    with pytest.raises(ValueError, match="unknown model 'unet9'.*rwkv_unet_t"):
        create_model("unet9")


@pytest.mark.parametrize("name", SMALL)
@pytest.mark.parametrize("in_chans,num_classes,hw", [(3, 1, (67, 45)), (1, 2, (33, 50)), (3, 4, (64, 64)), (1, 1, (17, 23))])
def test_any_size_and_channels(name, in_chans, num_classes, hw):
    torch.manual_seed(0)
    model = create_model(name, in_chans=in_chans, num_classes=num_classes).eval()
    with torch.no_grad():
        out = model(torch.randn(2, in_chans, *hw))
    assert out.shape == (2, num_classes, *hw)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", SMALL)
def test_every_parameter_receives_a_gradient(name):
    torch.manual_seed(0)
    model = create_model(name, in_chans=3, num_classes=2).train()
    out = model(torch.randn(2, 3, 48, 40))
    target = torch.randint(0, 2, (2, 48, 40))
    torch.nn.functional.cross_entropy(out, target).backward()
    silent = [n for n, p in model.named_parameters() if p.grad is None or not torch.any(p.grad != 0)]
    assert not silent, f"parameters without gradient: {silent}"


@pytest.mark.parametrize("name", SMALL)
def test_trains_under_mixed_precision(name):
    """nm.train runs the network under bfloat16 autocast on a GPU; every op must accept the
    mix of bfloat16 activations and float32 parameters (CPU autocast stands in for CUDA's)."""
    torch.manual_seed(0)
    model = create_model(name, in_chans=3, num_classes=2).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(2, 3, 48, 40))
    assert out.shape == (2, 2, 48, 40)
    target = torch.randint(0, 2, (2, 48, 40))
    torch.nn.functional.cross_entropy(out.float(), target).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("name", SMALL)
def test_deterministic_given_a_seed(name):
    torch.manual_seed(7)
    a = create_model(name).state_dict()
    torch.manual_seed(7)
    b = create_model(name).state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[key], b[key]) for key in a)


@pytest.mark.parametrize("name", SMALL)
def test_padding_does_not_leak_between_batch_items(name):
    # A batch of two must give each image the result it gets alone.
    torch.manual_seed(0)
    model = create_model(name).eval()
    x = torch.randn(2, 3, 40, 56)
    with torch.no_grad():
        both = model(x)
        first = model(x[:1])
    assert torch.allclose(both[:1], first, atol=1e-4)
