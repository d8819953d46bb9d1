"""The headless engine: load_model, segment, train, evaluate."""
import time
from dataclasses import replace

import numpy as np
import pytest
import torch
from scipy import ndimage

import napari_medrwkv as nm
from napari_medrwkv.engine.fuse import ConvAct, TokenLinear, fuse_for_inference
from napari_medrwkv.engine.infer import blend_window, tile_starts
from napari_medrwkv.models import create_model

from conftest import random_image


@pytest.fixture(scope="module")
def binary_model():
    torch.manual_seed(0)
    return nm.load_model("rwkv_unet_t", device="cpu")


@pytest.mark.parametrize("name", ["rwkv_unet_t", "med_urwkv_t", "ds_vrwkv_t"])
def test_fused_inference_net_gives_the_same_output(name):
    torch.manual_seed(0)
    net = create_model(name).train()
    with torch.no_grad():                       # non-trivial running statistics
        for _ in range(3):
            net(torch.randn(2, 3, 48, 48) * 2 + 0.5)
    net.eval()
    x = torch.randn(1, 3, 40, 56)
    fused = fuse_for_inference(net)
    with torch.inference_mode():
        expected = net(x)
        assert torch.allclose(fused(x), expected, atol=1e-4)
        assert torch.allclose(fused(x.contiguous(memory_format=torch.channels_last)), expected, atol=1e-4)
        # other dtypes take the plain conv/linear paths of the fused modules
        assert torch.allclose(fuse_for_inference(net.double())(x.double()), expected.double(), atol=1e-4)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules()), "the original is left untouched"
    assert not any(isinstance(m, torch.nn.Linear) and not isinstance(m, TokenLinear) for m in fused.modules())
    if name == "rwkv_unet_t":       # every BatchNorm folded (pre-norms included), every activation fused
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
        fused_acts = {id(m.act) for m in fused.modules() if isinstance(m, ConvAct)}
        assert fused_acts and all(id(m) in fused_acts for m in fused.modules() if isinstance(m, torch.nn.ReLU))


def test_conv_act_and_token_linear_match_their_plain_modules():
    torch.manual_seed(0)
    for conv, act in [(torch.nn.Conv2d(5, 7, 3, stride=2, padding=1), torch.nn.SiLU()),
                      (torch.nn.Conv2d(6, 6, 5, padding=2, groups=6, dilation=1), torch.nn.ReLU()),
                      (torch.nn.Conv2d(4, 9, 1, bias=False), torch.nn.ReLU())]:
        fused = ConvAct(conv, act)
        for x in (torch.randn(2, conv.in_channels, 13, 10),
                  torch.randn(1, conv.in_channels, 9, 16).contiguous(memory_format=torch.channels_last)):
            with torch.no_grad():
                assert torch.allclose(fused(x), act(conv(x)), atol=1e-5)
    with pytest.raises(ValueError, match="zero-padded"):
        ConvAct(torch.nn.Conv2d(3, 3, 3, padding=1, padding_mode="reflect"), torch.nn.ReLU())
    linear = torch.nn.Linear(11, 6)
    token = TokenLinear.from_linear(linear)
    assert token.weight is linear.weight and token.bias is linear.bias       # shares, no copy
    for x in (torch.randn(3, 17, 11), torch.randn(17, 11), torch.randn(2, 5, 17, 11), torch.randn(1, 1, 11),
              torch.randn(3, 11, 17).transpose(1, 2)):
        with torch.no_grad():
            assert torch.allclose(token(x), linear(x), atol=1e-5)
            assert token(x).is_contiguous()


@pytest.mark.parametrize("name", ["rwkv_unet_t", "med_urwkv_t", "ds_vrwkv_t"])
def test_inference_mode_forward_equals_the_autograd_forward(name):
    # Without autograd the channel and spatial mixes overwrite their fresh projections in
    # place; the answer must not change, and the input must not be touched.
    torch.manual_seed(0)
    net = create_model(name).eval()
    x = torch.randn(1, 3, 40, 56)
    kept = x.clone()
    expected = net(x)
    assert expected.requires_grad
    with torch.inference_mode():
        got = net(x)
    assert torch.allclose(got, expected.detach(), atol=1e-5, rtol=1e-5)
    assert torch.equal(x, kept)


@pytest.mark.parametrize("shape,dtype", [((70, 90), np.uint8), ((70, 90, 3), np.uint8), ((70, 90, 4), np.uint8),
                                         ((70, 90), np.uint16), ((70, 90), np.float32), ((3, 40, 50), np.uint8),
                                         ((2, 40, 50, 3), np.uint16)])
def test_segment_any_layout_and_dtype(binary_model, shape, dtype):
    image = random_image(shape, dtype)
    labels = nm.segment(image, model=binary_model)
    spatial = shape[:-1] if shape[-1] in (3, 4) else shape
    assert labels.shape == spatial and labels.dtype == np.uint8
    assert set(np.unique(labels)) <= {0, 1}


@pytest.mark.parametrize("shape", [(70, 90, 3), (2, 45, 61)])
def test_test_time_flips_average_the_flipped_predictions(binary_model, shape):
    image = random_image(shape)
    _, plain = nm.segment(image, model=binary_model, return_probabilities=True)
    labels, flipped = nm.segment(image, model=binary_model, return_probabilities=True, flips=True)
    # the reference: four plain calls on flipped images, flipped back and averaged
    y, x = (0, 1) if shape[-1] == 3 else (1, 2)         # RGB image, or a stack of grey planes
    views = [(), (x,), (y,), (y, x)]
    reference = np.mean([np.flip(nm.segment(np.flip(image, axes) if axes else image, model=binary_model,
                                            return_probabilities=True)[1], axes) if axes else plain
                         for axes in views], axis=0)
    np.testing.assert_allclose(flipped, reference, atol=1e-5)
    assert np.array_equal(labels, (flipped > 0.5).astype(labels.dtype))
    assert not np.allclose(flipped, plain, atol=1e-3), "an untrained net is not flip-invariant by itself"
    # so the answer no longer depends on which way up the image is
    _, of_mirror = nm.segment(np.flip(image, x), model=binary_model, return_probabilities=True, flips=True)
    np.testing.assert_allclose(np.flip(of_mirror, x), flipped, atol=1e-5)


def test_probabilities_binary_and_multiclass(binary_model):
    image = random_image((64, 80, 3))
    labels, probs = nm.segment(image, model=binary_model, return_probabilities=True)
    assert probs.shape == (64, 80) and probs.min() >= 0 and probs.max() <= 1
    assert np.array_equal(labels, (probs > 0.5).astype(np.uint8))
    torch.manual_seed(0)
    multi = nm.load_model("rwkv_unet_t", device="cpu", num_classes=3)
    labels, probs = nm.segment(np.stack([image] * 2), model=multi, return_probabilities=True)
    assert probs.shape == (3, 2, 64, 80)
    assert np.allclose(probs.sum(0), 1, atol=1e-5)
    assert np.array_equal(labels, probs.argmax(0))


@pytest.mark.parametrize("classes,largest", [(1, False), (1, True), (3, False)])
def test_a_stack_segments_as_its_planes_do_alone(classes, largest):
    # Labels are made plane by plane (the stack's probabilities are kept only when asked): the
    # reference is each plane segmented as a 2D image, tiled, with its own largest object.
    torch.manual_seed(1)
    model = nm.load_model("rwkv_unet_t", device="cpu", num_classes=classes)
    stack = random_image((3, 70, 90), seed=5)
    options = dict(model=model, tile=48, **({"largest_component": True, "threshold": 0.45} if largest else {}))
    labels, probs = nm.segment(stack, return_probabilities=True, **options)
    alone = [nm.segment(plane, return_probabilities=True, **options) for plane in stack]
    assert np.array_equal(labels, np.stack([plane_labels for plane_labels, _ in alone]))
    np.testing.assert_array_equal(probs, np.stack([p for _, p in alone], axis=0 if classes == 1 else 1))
    assert np.array_equal(nm.segment(stack, **options), labels)
    if largest:
        assert all(ndimage.label(plane, np.ones((3, 3)))[1] <= 1 for plane in labels)


def test_tiles_cover_the_plane_with_the_overlap_asked():
    for size, tile in [(1000, 256), (257, 256), (256, 256), (100, 256), (4000, 512)]:
        starts = tile_starts(size, tile, tile // 4)
        assert starts[0] == 0 and starts[-1] + min(tile, size) == size
        assert all(b - a <= tile - tile // 4 for a, b in zip(starts, starts[1:]))
    window = blend_window(64, 48)
    assert window.min() > 0 and window[32, 24] > 0.99 and window[0, 0] < 0.01


def test_tiled_large_image_reports_progress_per_tile(binary_model):
    calls = []
    labels = nm.segment(random_image((300, 200)), model=binary_model, tile=128, progress=lambda d, t: calls.append((d, t)))
    assert labels.shape == (300, 200)
    assert calls == [(i, 6) for i in range(1, 7)]          # 3 x 2 tiles of 128 with >= 32 overlap


def test_tiling_agrees_with_one_piece_on_a_smooth_model(binary_model):
    # Overlapping, blended tiles must not leave seams: on a real image the tiled
    # probabilities stay close to the whole-image ones away from nothing but context.
    image = random_image((160, 160, 3), seed=3)
    _, whole = nm.segment(image, model=binary_model, tile=512, return_probabilities=True)
    _, tiled = nm.segment(image, model=binary_model, tile=96, return_probabilities=True)
    assert np.abs(whole - tiled).mean() < 0.1


def test_cancel_stops_before_the_next_batch_of_tiles(binary_model):
    # Small tiles run in batches on the CPU (engine/tiling.py); cancel is honoured between batches.
    from napari_medrwkv.engine.tiling import batch_size, plan_tiles
    plan = plan_tiles((600, 600), binary_model.info.architecture, tile=256)
    batch = batch_size(plan, binary_model.info.architecture, binary_model.device)
    assert 1 < batch < plan.count
    seen = []
    with pytest.raises(nm.Cancelled):
        nm.segment(random_image((600, 600)), model=binary_model, tile=256, progress=lambda d, t: seen.append(d),
                   cancel=lambda: len(seen) >= 2)
    assert seen == list(range(1, batch + 1))


def test_bad_inputs_are_named(binary_model):
    with pytest.raises(ValueError, match=r"shape \(2, 3, 40, 50\)"):
        nm.segment(np.zeros((2, 3, 40, 50)), model=binary_model)
    with pytest.raises(ValueError, match="tile=8"):
        nm.segment(np.zeros((40, 50)), model=binary_model, tile=8)
    with pytest.raises(ValueError, match="neither a shipped model"):
        nm.load_model("no_such_model")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            nm.load_model("rwkv_unet_t", device="cuda")


def test_train_learns_the_samples_and_saves_provenance(sample_arrays, tmp_path):
    out = tmp_path / "tuned.safetensors"
    cfg = nm.TrainConfig(patch_size=64, batch_size=4, samples_per_epoch=8, lr=3e-3)
    seen = []
    result = nm.train("rwkv_unet_t", sample_arrays, out=out, epochs=6, device="cpu", val_data=sample_arrays,
                      config=cfg, progress=seen.append)
    losses = [r.loss for r in result.history]
    assert len(losses) == 6 and losses[-1] < losses[0]
    validated = [r for r in result.history if r.val_dice is not None]      # see validation_due
    assert validated[0].epoch == 1 and validated[-1].epoch == 6
    best = max(validated, key=lambda r: r.val_dice)
    assert (result.best_val_dice, result.best_epoch) == (best.val_dice, best.epoch)
    assert any(p.val_dice is not None for p in seen) and seen[-1].fraction == 1.0
    assert result.start_val_dice is None             # a fresh architecture's start is no candidate
    model = nm.load_model(out, device="cpu")
    assert model.info.training["epochs"] == 6 and model.info.training["best_epoch"] == result.best_epoch
    assert model.info.metrics["val_dice"] == pytest.approx(result.best_val_dice)
    labels = nm.segment(sample_arrays[0][0], model=model)
    assert labels.shape == sample_arrays[0][1].shape


def test_input_scale_runs_the_network_on_the_resized_image(binary_model):
    """A model with input_scale 0.5 sees the image at half size and answers at full size."""
    import copy
    import torch.nn.functional as F
    from napari_medrwkv.engine.preprocess import image_to_channels
    half = copy.copy(binary_model)
    half.info = copy.deepcopy(binary_model.info)
    half.info.input_scale = 0.5
    image = random_image((90, 130, 3))
    labels, probs = nm.segment(image, model=half, return_probabilities=True)
    assert labels.shape == probs.shape == (90, 130)
    x = torch.from_numpy(image_to_channels(image, 3))[None]
    small = F.interpolate(x, size=(45, 65), mode="bilinear", align_corners=False, antialias=True)
    with torch.inference_mode():
        expected = torch.sigmoid(binary_model.net.eval()(small))
    expected = F.interpolate(expected, size=(90, 130), mode="bilinear", align_corners=False)[0, 0].numpy()
    assert np.abs(probs - expected).max() < 1e-4
    # tiles count network pixels: 512 px at half size fit one 256-px tile
    ticks = []
    nm.segment(random_image((512, 512)), model=half, tile=256, progress=lambda d, t: ticks.append(t))
    assert ticks == [1]


def test_training_with_input_scale_is_stored_and_kept_when_fine_tuning(sample_arrays, tmp_path):
    from napari_medrwkv.engine.datasets import SegmentationDataset
    data = SegmentationDataset(sample_arrays, 3, 1, patch_size=64, augment=False, input_scale=0.5)
    x, y = data.full_item(0)
    assert x.shape[1:] == y.shape == tuple(s // 2 for s in sample_arrays[0][1].shape)
    cfg = nm.TrainConfig(patch_size=48, batch_size=2, samples_per_epoch=4, input_scale=0.5)
    first = nm.train("ds_vrwkv_t", sample_arrays, out=tmp_path / "a.safetensors", epochs=1, device="cpu", config=cfg)
    assert nm.load_model(first.path, device="cpu").info.input_scale == 0.5
    cfg = nm.TrainConfig(patch_size=48, batch_size=2, samples_per_epoch=4)
    again = nm.train(first.path, sample_arrays, out=tmp_path / "b.safetensors", epochs=1, device="cpu", config=cfg)
    assert nm.load_model(again.path, device="cpu").info.input_scale == 0.5
    with pytest.raises(ValueError, match="input_scale"):
        nm.train("ds_vrwkv_t", sample_arrays, epochs=1, config=nm.TrainConfig(input_scale=-1))


def test_train_is_deterministic_given_a_seed(sample_arrays):
    cfg = nm.TrainConfig(patch_size=48, batch_size=2, samples_per_epoch=4, seed=3)
    a = nm.train("ds_vrwkv_t", sample_arrays, epochs=1, device="cpu", config=cfg).model.net.state_dict()
    b = nm.train("ds_vrwkv_t", sample_arrays, epochs=1, device="cpu", config=cfg).model.net.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name", ["rwkv_unet_t", "med_urwkv_t", "ds_vrwkv_t"])
def test_freeze_holds_exactly_what_it_names(sample_arrays, name):
    torch.manual_seed(0)
    base = nm.load_model(name, device="cpu")
    before = {k: v.clone() for k, v in base.net.state_dict().items()}
    encoder = {f"{part}." for part in base.net.encoder_parts}
    cfg = nm.TrainConfig(patch_size=48, batch_size=2, samples_per_epoch=4, lr=1e-2)

    def changed(result):
        after = result.model.net.state_dict()
        return {k for k in before if before[k].is_floating_point() and not torch.equal(before[k], after[k])}

    moved = changed(nm.train(base, sample_arrays, epochs=1, device="cpu", config=replace(cfg, freeze="encoder")))
    assert moved and not any(k.startswith(tuple(encoder)) for k in moved)            # the decoder trained
    moved = changed(nm.train(base, sample_arrays, epochs=1, device="cpu", config=replace(cfg, freeze="norm_stats")))
    assert not any(k.endswith(("running_mean", "running_var")) for k in moved)
    assert any(k.startswith(tuple(encoder)) and k.endswith(".weight") for k in moved)   # weights still train
    result = nm.train(base, sample_arrays, epochs=1, device="cpu", config=cfg)
    assert any(k.endswith("running_mean") for k in changed(result))
    assert all(p.requires_grad for p in result.model.net.parameters())        # nothing stays frozen afterwards
    with pytest.raises(ValueError, match="freeze='everything'.*'norm_stats'"):
        nm.train(base, sample_arrays, epochs=1, config=replace(cfg, freeze="everything"))


def test_cancel_and_time_budget_keep_the_best_model(sample_arrays, tmp_path):
    cfg = nm.TrainConfig(patch_size=48, batch_size=2, samples_per_epoch=8)
    result = nm.train("ds_vrwkv_t", sample_arrays, out=tmp_path / "c.safetensors", epochs=50, device="cpu",
                      config=cfg, cancel=lambda: True)
    assert result.cancelled and len(result.history) == 1 and result.path.exists()
    result = nm.train("ds_vrwkv_t", sample_arrays, max_minutes=0.001, device="cpu", config=cfg)
    assert not result.cancelled and len(result.history) == 1


def test_train_rejects_bad_output_and_data(sample_arrays, tmp_path):
    with pytest.raises(ValueError, match=r"\.safetensors"):
        nm.train("rwkv_unet_t", sample_arrays, out=tmp_path / "model.pt", epochs=1)
    with pytest.raises(ValueError, match="does not exist"):
        nm.train("rwkv_unet_t", sample_arrays, out=tmp_path / "no" / "m.safetensors", epochs=1)
    with pytest.raises(ValueError, match="no_such_folder"):
        nm.train("rwkv_unet_t", str(tmp_path / "no_such_folder"), epochs=1)
    image, mask = sample_arrays[0]
    with pytest.raises(ValueError, match="256x256 but its mask is 10x10"):
        nm.train("rwkv_unet_t", [(image, mask[:10, :10])] * 2, epochs=1)


def test_evaluate_reports_means_and_per_image(binary_model, sample_folder):
    scores = nm.evaluate(binary_model, str(sample_folder))
    assert scores["n"] == 2 and {s["name"] for s in scores["per_image"]} == {"nuclei_fluorescence", "nuclei_brightfield"}
    assert 0 <= scores["dice"] <= 1 and 0 <= scores["iou"] <= scores["dice"] + 1e-9
    assert scores["dice"] == pytest.approx(np.mean([s["dice"] for s in scores["per_image"]]))
    picked = nm.evaluate(binary_model, str(sample_folder), include=["*fluor*"])
    fluorescence = next(s for s in scores["per_image"] if s["name"] == "nuclei_fluorescence")
    assert picked["n"] == 1 and picked["per_image"][0]["name"] == "nuclei_fluorescence"
    assert picked["dice"] == fluorescence["dice"]
    with pytest.raises(ValueError, match="'benign_\\*' matches no image"):
        nm.evaluate(binary_model, str(sample_folder), include=["benign_*"])


def test_val_include_ranks_on_the_matching_validation_pairs_only(sample_folder, sample_arrays):
    # The start's val Dice is what evaluate gives on the included pair alone, not on both.
    start = nm.load_model("rwkv_unet_t-dsb2018", device="cpu")
    cfg = nm.TrainConfig(patch_size=48, batch_size=2, samples_per_epoch=2)
    result = nm.train(start, str(sample_folder), epochs=1, device="cpu", val_data=str(sample_folder),
                      val_include=["*bright*"], config=cfg)
    alone = nm.evaluate(start, str(sample_folder), include=["*bright*"])["dice"]
    both = nm.evaluate(start, str(sample_folder))["dice"]
    assert result.start_val_dice == pytest.approx(alone) and abs(alone - both) > 1e-3
    assert result.model.info.training["val_include"] == ["*bright*"]
    with pytest.raises(ValueError, match="val_include pattern 'benign_\\*' matches no image stem in the validation pairs of"):
        nm.train(start, str(sample_folder), epochs=1, device="cpu", val_data=str(sample_folder),
                 val_include=["benign_*"], config=cfg)
    with pytest.raises(ValueError, match="val_include= picks pairs of a dataset folder by stem"):
        nm.train(start, sample_arrays, epochs=1, device="cpu", val_include=["*"], config=cfg)   # no stems


def test_bad_sampling_settings_are_refused_before_training(sample_arrays):
    cfg = nm.TrainConfig(patch_size=48, batch_size=2, samples_per_epoch=4)
    for bad, message in ((dict(augment_strength=-1), "augment_strength"), (dict(augment_strength=4), "augment_strength"),
                         (dict(foreground=1.5), "foreground=1.5")):
        with pytest.raises(ValueError, match=message):
            nm.train("no_such_model", sample_arrays, epochs=1, config=replace(cfg, **bad))   # before the model loads


def test_weight_average_follows_its_definition():
    from napari_medrwkv.engine.train import WeightAverage
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    average = WeightAverage(net, decay=0.8)
    expected = {k: v.double().clone() for k, v in net.state_dict().items()}
    for n in range(1, 30):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
        net.train()(torch.randn(4, 3))                  # moves the running statistics and the counter
        average.update(net)
        d = min(0.8, (1 + n) / (10 + n))
        for k, v in net.state_dict().items():
            expected[k] = d * expected[k] + (1 - d) * v.double() if v.is_floating_point() else v.double()
    got = average.net.state_dict()
    for k, v in expected.items():
        assert torch.allclose(got[k].double(), v, atol=1e-6), k
    assert got["1.num_batches_tracked"] == 29
    assert not average.net.training and not any(p.requires_grad for p in average.net.parameters())


def test_train_with_a_weight_average_keeps_the_average_it_validated(sample_arrays):
    from napari_medrwkv.engine.train import validate
    cfg = nm.TrainConfig(patch_size=48, batch_size=2, samples_per_epoch=8, seed=1, lr=1e-2)
    raw = nm.train("ds_vrwkv_t", sample_arrays, val_data=sample_arrays, epochs=1, device="cpu", config=cfg)
    averaged = nm.train("ds_vrwkv_t", sample_arrays, val_data=sample_arrays, epochs=1, device="cpu",
                        config=replace(cfg, ema=0.9))
    a, b = raw.model.net.state_dict(), averaged.model.net.state_dict()
    assert any(not torch.equal(a[k], b[k]) for k in a)
    assert validate(averaged.model.net, sample_arrays, averaged.model) == pytest.approx(averaged.best_val_dice,
                                                                                        abs=1e-6)
    with pytest.raises(ValueError, match="ema=1"):
        nm.train("ds_vrwkv_t", sample_arrays, epochs=1, config=replace(cfg, ema=1))


def test_training_without_validation_data_keeps_an_epoch_whatever_its_loss():
    # One image leaves nothing to validate on, so epochs are scored by their loss; with eight
    # classes it starts above 1, which once left no epoch kept and crashed after the whole run.
    rng = np.random.default_rng(0)
    pair = (rng.integers(0, 255, (64, 64, 3), dtype=np.uint8), rng.integers(0, 8, (64, 64)).astype(np.uint8))
    model = nm.load_model("rwkv_unet_t", num_classes=8, device="cpu")
    cfg = nm.TrainConfig(patch_size=32, batch_size=2, samples_per_epoch=2)
    result = nm.train(model, [pair], epochs=1, device="cpu", config=cfg)
    assert result.history[0].loss > 1 and result.best_epoch == 1 and result.best_val_dice is None


def test_fine_tuning_that_only_hurts_gives_the_starting_weights_back(sample_arrays, tmp_path):
    # The shipped nuclei model on the bundled nuclei samples, one epoch at a learning rate that
    # wrecks it: no epoch beats the start on the validation images, so the start is what comes back.
    start = nm.load_model("rwkv_unet_t-dsb2018", device="cpu")
    cfg = nm.TrainConfig(patch_size=64, batch_size=2, samples_per_epoch=4, lr=1.0, warmup_fraction=0.0)
    out = tmp_path / "tuned.safetensors"
    result = nm.train(start, sample_arrays, out=out, epochs=1, device="cpu", val_data=sample_arrays, config=cfg)
    assert result.start_val_dice > 0.5 and result.history[0].val_dice < result.start_val_dice
    assert result.best_epoch == 0 and result.best_val_dice == result.start_val_dice
    before, after = start.net.state_dict(), result.model.net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    saved = nm.load_model(out, device="cpu")
    assert saved.info.training["best_epoch"] == 0 and saved.info.training["blend"] == 1.0
    assert saved.info.training["start_val_dice"] == pytest.approx(result.start_val_dice)


def test_the_starting_weights_score_is_reported_before_the_first_step(sample_arrays):
    # The Fine-tune widget draws its "before" line from this report instead of measuring the start again.
    start = nm.load_model("rwkv_unet_t-dsb2018", device="cpu")
    cfg = nm.TrainConfig(patch_size=64, batch_size=2, samples_per_epoch=4, lr=1e-4)
    seen = []
    result = nm.train(start, sample_arrays, epochs=1, device="cpu", val_data=sample_arrays, config=cfg,
                      progress=seen.append)
    first = seen[0]
    assert (first.epoch, first.step, first.fraction) == (0, 0, 0.0) and np.isnan(first.loss)
    assert first.val_dice == result.start_val_dice == pytest.approx(nm.evaluate(start, sample_arrays)["dice"])
    assert [p.epoch for p in seen[1:]] == [1] * len(seen[1:])


def test_cancelling_while_the_start_is_measured_saves_nothing(sample_arrays, tmp_path):
    start = nm.load_model("rwkv_unet_t-dsb2018", device="cpu")
    out = tmp_path / "never.safetensors"
    seen = []
    with pytest.raises(nm.Cancelled):
        nm.train(start, sample_arrays, out=out, epochs=3, device="cpu", val_data=sample_arrays,
                 config=nm.TrainConfig(patch_size=64), cancel=lambda: True, progress=seen.append)
    assert not out.exists() and not seen


def test_the_kept_weights_are_the_best_of_the_start_the_blend_and_the_epoch(sample_arrays):
    # Real weights, real validation: the shipped nuclei model and copies of it disturbed by noise.
    from napari_medrwkv.engine.train import TrainResult, _keep_or_blend, validate
    model = nm.load_model("rwkv_unet_t-dsb2018", device="cpu")
    net = model.net.eval()
    good = {k: v.clone() for k, v in net.state_dict().items()}

    def noisy(seed, scale):
        gen = torch.Generator().manual_seed(seed)
        return {k: v + scale * v.std() * torch.randn(v.shape, generator=gen)
                if v.is_floating_point() and v.numel() > 1 else v.clone() for k, v in good.items()}

    def score(state):
        net.load_state_dict(state)
        return validate(net, sample_arrays, model)

    def keep(start, epoch):
        result = TrainResult(model=model, best_epoch=3, start_val_dice=score(start))
        state, dice = _keep_or_blend(net, sample_arrays, model, start, epoch, score(epoch), 0.75, result)
        assert dice == score(state)
        return result, state, dice

    # Two differently disturbed copies: their blend carries less of either noise and beats both;
    # kept, exactly start + 3/4 (epoch - start).
    start, epoch = noisy(1, 0.03), noisy(2, 0.03)
    result, state, dice = keep(start, epoch)
    assert (result.best_epoch, result.blend) == (3, 0.75) and dice == result.blend_val_dice
    assert dice > score(epoch) and dice > score(start)
    assert all(torch.equal(state[k], start[k].lerp(epoch[k], 0.75)) for k in state if state[k].is_floating_point())
    # From a wrecked start to a good epoch: a quarter of the wreck sinks the blend, so the epoch
    # alone is kept (blend 1), and the blend's lower score is on record.
    result, state, dice = keep(noisy(0, 0.4), good)
    assert (result.best_epoch, result.blend) == (3, 1.0) and state is good
    assert dice > 0.9 and result.blend_val_dice < dice - 0.3
    # From a good start to a wrecked epoch: the start comes back, as best epoch 0.
    result, state, dice = keep(good, noisy(0, 0.1))
    assert (result.best_epoch, result.blend, dice) == (0, 1.0, result.start_val_dice) and state is good
    assert result.blend_val_dice < dice


def test_training_ranks_weights_as_the_model_will_segment_with_its_inference_settings(sample_arrays):
    # A model calibrated to keep one object per image at threshold 0.3, with flips (as the shipped
    # ultrasound model is), has its start, epochs and blend scored that way, not by logits > 0:
    # on the many-nuclei samples the two differ by far.  train's scores are evaluate's.
    start = nm.load_model("rwkv_unet_t-dsb2018", device="cpu")
    plain = nm.evaluate(start, sample_arrays)["dice"]
    start.info.inference = {"flips": True, "threshold": 0.3, "largest_component": True}
    calibrated = nm.evaluate(start, sample_arrays)["dice"]
    assert calibrated < plain - 0.3
    cfg = nm.TrainConfig(patch_size=64, batch_size=2, samples_per_epoch=4, lr=1e-4)
    result = nm.train(start, sample_arrays, epochs=1, device="cpu", val_data=sample_arrays, config=cfg)
    assert result.start_val_dice == pytest.approx(calibrated, abs=1e-4)
    assert result.history[0].val_dice < plain - 0.3
    assert result.best_val_dice == pytest.approx(nm.evaluate(result.model, sample_arrays)["dice"], abs=1e-4)
    assert result.model.info.inference == start.info.inference


def test_training_from_trained_weights_keeps_the_blend_asked_for(sample_arrays):
    # Deterministic with a seed: the same run with blend 1 gives the epoch's weights, so the run
    # with blend 0.5 must keep exactly the midpoint of those and the start's.  One image: no
    # validation data, so the blend is kept unchecked.
    start = nm.load_model("rwkv_unet_t-dsb2018", device="cpu")
    cfg = nm.TrainConfig(patch_size=64, batch_size=2, samples_per_epoch=4, seed=3)
    whole = nm.train(start, sample_arrays[:1], epochs=1, device="cpu", config=cfg)
    half = nm.train(start, sample_arrays[:1], epochs=1, device="cpu", config=replace(cfg, blend=0.5))
    assert (whole.blend, half.blend, half.best_epoch) == (1.0, 0.5, 1)
    s0, s1, kept = start.net.state_dict(), whole.model.net.state_dict(), half.model.net.state_dict()
    assert not torch.equal(s1["head.weight"], s0["head.weight"])
    for k in kept:
        if kept[k].is_floating_point():
            torch.testing.assert_close(kept[k], s0[k].lerp(s1[k], 0.5), rtol=0, atol=1e-6)
    assert half.model.info.training["blend"] == 0.5
    with pytest.raises(ValueError, match="blend=0"):
        nm.train(start, sample_arrays[:1], epochs=1, device="cpu", config=replace(cfg, blend=0))


def test_a_model_trained_in_memory_is_a_starting_candidate_when_trained_again(sample_arrays):
    # Trained from an architecture name and not saved, the model keeps that name as its source;
    # its weights are trained all the same, so a second run must not lose them to a worse epoch.
    cfg = nm.TrainConfig(patch_size=64, batch_size=2, samples_per_epoch=4)
    first = nm.train("rwkv_unet_t", sample_arrays, epochs=1, device="cpu", val_data=sample_arrays, config=cfg)
    assert first.start_val_dice is None and first.model.source == "rwkv_unet_t"
    second = nm.train(first.model, sample_arrays, epochs=1, device="cpu", val_data=sample_arrays, config=cfg)
    assert second.start_val_dice == pytest.approx(first.best_val_dice, abs=1e-6)


def test_validation_due_spaces_costly_validations():
    from napari_medrwkv.engine.train import VALIDATION_SPACING, validation_due
    assert validation_due(0.1, None, finishing=False)               # the first epoch
    assert validation_due(0.1, 50.0, finishing=True)                # the last epoch
    assert not validation_due(10.0, 50.0, finishing=False)          # validating costs 5x the epoch
    assert validation_due(VALIDATION_SPACING * 50.0, 50.0, finishing=False)
    assert validation_due(3.0, 1.0, finishing=False)                # cheap validation: every epoch


def test_costly_validation_is_spaced_out_and_the_last_epoch_validated(sample_arrays):
    # Validating on two large images costs far more than an epoch of one 32-px batch: the
    # validations are spaced out, the last epoch's state is validated, and the kept model is
    # one that was validated.
    image, mask = sample_arrays[1]
    large = [(np.tile(image, (2, 2, 1)), np.tile(mask, (2, 2)))] * 2
    cfg = nm.TrainConfig(patch_size=32, batch_size=2, samples_per_epoch=2)
    result = nm.train("ds_vrwkv_t", sample_arrays, val_data=large, epochs=5, device="cpu", config=cfg)
    validated = [r.epoch for r in result.history if r.val_dice is not None]
    assert len(result.history) == 5 and validated[0] == 1 and validated[-1] == 5
    assert len(validated) < 5, [(r.epoch, round(r.seconds, 2)) for r in result.history]
    assert result.best_epoch in validated
    assert result.best_val_dice == max(r.val_dice for r in result.history if r.val_dice is not None)


def test_time_budget_spent_in_validation_ends_training(sample_arrays):
    # The steps of epoch 1 end inside the budget; its validation (and the progress call after
    # it, made slow here) uses the rest.  No second epoch may start.
    cfg = nm.TrainConfig(patch_size=48, batch_size=2, samples_per_epoch=4)
    budget = 0.15 * 60
    steps_done_at, validations = {}, []

    def slow_after_validation(p):
        if p.val_dice is None:
            steps_done_at[p.epoch] = p.elapsed
        else:
            validations.append(p.epoch)
            time.sleep(budget + 0.5)

    result = nm.train("ds_vrwkv_t", sample_arrays, max_minutes=budget / 60, device="cpu", config=cfg,
                      progress=slow_after_validation)
    if steps_done_at[1] >= budget:
        pytest.skip(f"epoch 1's steps took {steps_done_at[1]:.0f} s here, more than the {budget:.0f} s budget")
    assert len(result.history) == 1 and validations == [1]
