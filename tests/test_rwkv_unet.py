"""RWKV-UNet against the facts of the paper's code."""
import pytest
import torch

from napari_medrwkv.models import create_model
from napari_medrwkv.models.rwkv_unet import GLSP, CONFIGS
from napari_medrwkv.models.layers import SpatialMix, q_shift


def _params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name,expected", [("rwkv_unet_t", 3.15e6), ("rwkv_unet_s", 9.70e6), ("rwkv_unet_b", 17.13e6)])
def test_parameter_counts_match_the_paper_code(name, expected):
    # Counted over the modules the authors' forward uses (their dead per-block attention excluded).
    assert abs(_params(create_model(name)) - expected) / expected < 0.03


@pytest.mark.parametrize("variant", ["t", "s", "b"])
def test_attention_only_in_stages_three_and_four(variant):
    model = create_model(f"rwkv_unet_{variant}")
    cfg = CONFIGS[variant]
    for i, stage in enumerate(model.encoder.stages):
        blocks = list(stage)
        assert blocks[0].attn is None, "the downsampling block never attends"
        for block in blocks[1:]:
            assert (block.attn is not None) == cfg.attention_stages[i]
    assert model.encoder.stem.attn is None


def test_stage_widths_and_downsampling():
    model = create_model("rwkv_unet_t").eval()
    with torch.no_grad():
        feats = model.encoder(torch.randn(1, 3, 64, 96))
    assert [f.shape[1] for f in feats] == [32, 48, 96, 160]
    assert [f.shape[-2:] for f in feats] == [(32, 48), (16, 24), (8, 12), (4, 6)]


def test_attention_uses_zero_init_and_key_norm():
    block = create_model("rwkv_unet_t").encoder.stages[2][1]
    assert isinstance(block, GLSP) and isinstance(block.attn, SpatialMix)
    assert torch.all(block.attn.spatial_decay == 0) and torch.all(block.attn.spatial_mix_k == 0.5)
    assert block.attn.key_norm is not None


def test_ccm_follows_the_input_size():
    # The paper's CCM is fixed to one square size; ours must serve any.
    model = create_model("rwkv_unet_t").eval()
    with torch.no_grad():
        for hw in [(64, 64), (48, 112), (100, 36)]:
            assert model(torch.randn(1, 3, *hw)).shape[-2:] == hw


def _q_shift_by_the_definition(x, hw, shift):
    """Each of four channel groups reads the pixel ``shift`` away (left, right, up, down), 0 outside."""
    B, T, C = x.shape
    H, W = hw
    g = C // 4
    grid = x.transpose(1, 2).reshape(B, C, H, W)
    out = torch.zeros_like(grid)
    for c in range(C):
        dy, dx = [(0, -shift), (0, shift), (-shift, 0), (shift, 0)][c // g] if c < 4 * g else (0, 0)
        for y in range(H):
            for x_ in range(W):
                if 0 <= y + dy < H and 0 <= x_ + dx < W:
                    out[:, c, y, x_] = grid[:, c, y + dy, x_ + dx]
    return out.flatten(2).transpose(1, 2)


@pytest.mark.parametrize("hw,shift,C", [((5, 7), 1, 8), ((1, 1), 1, 4), ((3, 2), 2, 9), ((2, 6), 3, 12), ((4, 4), 1, 3)])
def test_q_shift_matches_its_definition(hw, shift, C):
    x = torch.randn(2, hw[0] * hw[1], C)
    assert torch.equal(q_shift(x, hw, shift), _q_shift_by_the_definition(x, hw, shift))


@pytest.mark.parametrize("hw,shift,C", [((5, 7), 1, 8), ((1, 1), 1, 4), ((3, 2), 2, 9), ((2, 6), 3, 12), ((4, 4), 1, 3)])
def test_q_shift_gradient_is_the_definitions(hw, shift, C):
    # The hand-written backward (the opposite shifts) against autograd through the definition.
    x = torch.randn(2, hw[0] * hw[1], C, dtype=torch.float64)
    grad_out = torch.randn_like(x)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    q_shift(a, hw, shift).backward(grad_out)
    reference = _q_shift_by_the_definition(b, hw, shift)
    if reference.requires_grad:
        reference.backward(grad_out)
        assert torch.equal(a.grad, b.grad)
    else:                   # a 1x1 grid with every channel shifted out: nothing flows back
        assert not a.grad.any()
    assert torch.autograd.gradcheck(lambda t: q_shift(t, hw, shift), (x.clone().requires_grad_(),))
