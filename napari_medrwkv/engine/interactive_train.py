"""Training a prompt-aware model by simulated users (RITM's protocol, see engine/interactive.py).

Each training example is one object of a dataset image (a connected part of a binary mask, or one
label of an instance mask) in a window as ``refine`` would cut it, with starting prompts: positive
clicks in its interior, negative clicks in the band around it, on other objects or in the
background, a box part of the time, a damaged copy of its mask part of the time.  Before each
gradient step, 0-3 rounds without gradients add the click the clicker would add (at the larger
error region's farthest point) and feed the prediction back as the previous mask.  Epochs are
ranked by the mean IoU over the first clicks of validation objects, clicked as
``bench/interactive.py`` does, through ``refine`` itself.  No Qt, no napari.
"""
import copy
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from scipy import ndimage

from ..models import create_model
from .checkpoint import save_checkpoint
from .datasets import find_pairs
from .imageio import read_image
from .interactive import (INPUT_SIZE, PROMPT_CHANNELS, add_prompt_inputs, encode_prompts, iou, next_click,
                          refine, square_window)
from .model import SegmentationModel, load_model
from .preprocess import image_to_channels, resize_channels, resize_labels
from .train import WeightAverage, _schedule, segmentation_loss

#: Objects smaller than this (pixels) are noise in a binary mask, not objects to click.
MIN_OBJECT = 16


@dataclass
class InteractiveConfig:
    lr: float = 5e-4
    weight_decay: float = 1e-4
    batch_size: int = 8
    input_size: int = INPUT_SIZE
    max_rounds: int = 3                  # clicks added without gradients before a step
    ema: float = 0.995
    validate_every_minutes: float = 12.0
    val_objects: int = 20                # per dataset folder
    val_clicks: int = 5
    seed: int = 0


@dataclass
class LabelledImage:
    image: np.ndarray                    # as read
    objects: np.ndarray                  # int32 (H, W): 0 background, 1..n the objects
    count: int
    source: str


def object_labels(mask: np.ndarray) -> Tuple[np.ndarray, int]:
    """Instance labels of a mask: an instance mask as it is; a binary one's 8-connected parts
    (each at least :data:`MIN_OBJECT` pixels)."""
    mask = np.asarray(mask)
    if mask.ndim == 3:
        mask = mask[..., 0]
    values = np.unique(mask)
    if len(values) > 2:                                   # instance labels
        objects = np.zeros(mask.shape, np.int32)
        for i, value in enumerate(v for v in values if v != 0):
            objects[mask == value] = i + 1
        return objects, int(objects.max())
    parts, count = ndimage.label(mask > 0, structure=np.ones((3, 3)))
    sizes = ndimage.sum_labels(np.ones_like(parts), parts, index=np.arange(1, count + 1))
    keep = np.zeros(count + 1, np.int32)
    kept = np.flatnonzero(sizes >= MIN_OBJECT)
    keep[kept + 1] = np.arange(1, len(kept) + 1)
    return keep[parts], len(kept)


def load_labelled(folder, split: Optional[str]) -> List[LabelledImage]:
    """The images of a dataset folder's split that hold at least one object."""
    items = []
    for pair in find_pairs(folder, split):
        objects, count = object_labels(read_image(pair.mask))
        if count:
            items.append(LabelledImage(read_image(pair.image), objects, count, f"{Path(folder).name}/{pair.stem}"))
    return items


# --------------------------------------------------------------------------- one simulated example


def _interior_point(region: np.ndarray, rng) -> Optional[Tuple[float, float]]:
    """A pixel well inside ``region`` (in its inner half by distance to the edge), or None."""
    distance = ndimage.distance_transform_edt(np.pad(region, 1))[1:-1, 1:-1]
    if distance.max() <= 0:
        return None
    rows, cols = np.nonzero(distance >= max(1.0, 0.5 * distance.max()))
    i = int(rng.integers(len(rows)))
    return float(rows[i]), float(cols[i])


def _negative_point(target: np.ndarray, others: np.ndarray, rng) -> Optional[Tuple[float, float]]:
    """Outside the object: in the band around it, on another object, or anywhere in the background."""
    kind = rng.random()
    if kind < 0.5:
        band = ndimage.binary_dilation(target, iterations=int(rng.integers(3, 12))) & ~target
    elif kind < 0.75 and others.any():
        band = others
    else:
        band = ~target
    rows, cols = np.nonzero(band)
    if len(rows) == 0:
        return None
    i = int(rng.integers(len(rows)))
    return float(rows[i]), float(cols[i])


def _damaged(target: np.ndarray, rng) -> np.ndarray:
    """The object's mask as an imperfect earlier answer: grown, shrunk, or with a piece cut off."""
    kind = rng.random()
    size = max(1, int(round(math.sqrt(target.sum()) * rng.uniform(0.05, 0.25))))
    if kind < 0.35:
        return ndimage.binary_dilation(target, iterations=size)
    if kind < 0.7:
        return ndimage.binary_erosion(target, iterations=size)
    rows, cols = np.nonzero(target)
    r, c = rows[int(rng.integers(len(rows)))], cols[int(rng.integers(len(rows)))]
    rr, cc = np.ogrid[:target.shape[0], :target.shape[1]]
    return target & (((rr - r) ** 2 + (cc - c) ** 2) > (2 * size) ** 2)


def _augment(x: np.ndarray, rng) -> np.ndarray:
    """Strong intensity and colour changes on the normalised channels: the model must follow clicks
    on kinds of images it never saw."""
    if rng.random() < 0.2:
        x = np.repeat(x.mean(0, keepdims=True), len(x), 0)
    if rng.random() < 0.2:
        x = x[rng.permutation(len(x))]
    if rng.random() < 0.1:
        x = -x
    gain = rng.uniform(0.6, 1.4, (len(x), 1, 1)).astype(np.float32)
    bias = rng.uniform(-0.4, 0.4, (len(x), 1, 1)).astype(np.float32)
    x = x * gain + bias
    if rng.random() < 0.5:
        x = x + rng.normal(0, rng.uniform(0, 0.1), x.shape).astype(np.float32)
    return np.ascontiguousarray(x, dtype=np.float32)


@dataclass
class Example:
    x: np.ndarray                        # float32 (3, S, S)
    target: np.ndarray                   # bool (S, S)
    points: List[Tuple[float, float, bool]] = field(default_factory=list)
    box: Optional[Tuple[float, float, float, float]] = None
    mask: Optional[np.ndarray] = None

    def prompt_maps(self) -> np.ndarray:
        return encode_prompts(len(self.target), self.points, self.box, self.mask)


def simulate_example(item: LabelledImage, rng, size: int = INPUT_SIZE, in_chans: int = 3) -> Example:
    """One object of ``item`` with starting prompts, in a window as ``refine`` cuts it."""
    label = int(rng.integers(1, item.count + 1))
    full_target = item.objects == label
    rows, cols = np.nonzero(full_target.any(1))[0], np.nonzero(full_target.any(0))[0]
    extent = (rows[0], cols[0], rows[-1] + 1, cols[-1] + 1)
    if rng.random() < 0.25:                     # the first click's window: its size knows nothing of the object
        r, c = _interior_point(full_target, rng)
        window = square_window(full_target.shape, (r, c, r + 1, c + 1), minimum=int(rng.integers(48, 96)))
    else:
        h, w = extent[2] - extent[0], extent[3] - extent[1]
        shift_r, shift_c = rng.uniform(-0.15, 0.15, 2) * (h, w)
        moved = (extent[0] + shift_r, extent[1] + shift_c, extent[2] + shift_r, extent[3] + shift_c)
        window = square_window(full_target.shape, moved, expand=rng.uniform(1.2, 2.0),
                               minimum=int(rng.integers(32, 80)))
    top, left, bottom, right = window
    crop = item.image[top:bottom, left:right]
    x = resize_channels(image_to_channels(crop, in_chans), (size, size))
    objects = resize_labels(item.objects[top:bottom, left:right], (size, size))
    target, others = objects == label, (objects > 0) & (objects != label)
    turns, flip = int(rng.integers(4)), rng.random() < 0.5
    x, target, others = (np.rot90(a, turns, axes=(-2, -1)) for a in (x, target, others))
    if flip:
        x, target, others = x[..., ::-1], target[:, ::-1], others[:, ::-1]
    x = _augment(np.ascontiguousarray(x), rng)
    target, others = np.ascontiguousarray(target), np.ascontiguousarray(others)
    example = Example(x, target)
    if not target.any():
        return example                          # the object vanished in the resize: learn "nothing here"
    has_box, has_mask = rng.random() < 0.4, rng.random() < 0.35
    positives = int(rng.choice([0, 1, 2], p=[0.15, 0.6, 0.25])) if (has_box or has_mask) else \
        int(rng.choice([1, 2], p=[0.7, 0.3]))
    for _ in range(positives):
        point = _interior_point(target, rng)
        if point is not None:
            example.points.append(point + (True,))
    for _ in range(int(rng.choice([0, 1, 2, 3], p=[0.5, 0.3, 0.12, 0.08]))):
        point = _negative_point(target, others, rng)
        if point is not None:
            example.points.append(point + (False,))
    if has_box:
        rs, cs = np.nonzero(target.any(1))[0], np.nonzero(target.any(0))[0]
        jitter = rng.uniform(-0.05, 0.05, 4) * size
        example.box = (rs[0] + jitter[0], cs[0] + jitter[1], rs[-1] + 1 + jitter[2], cs[-1] + 1 + jitter[3])
    if has_mask:
        example.mask = _damaged(target, rng)
    if not (example.points or example.box is not None or example.mask is not None):
        example.points.append(_interior_point(target, rng) + (True,))
    return example


# --------------------------------------------------------------------------- training


def promptable_start(start, device="cpu", input_size: int = INPUT_SIZE) -> SegmentationModel:
    """A prompt-aware model that computes what ``start`` (an automatic model, shipped name or file)
    computes until it is trained: its weights, with the prompt inputs added at zero; its windows
    are ``input_size`` pixels square."""
    model = load_model(start, device=device)
    if model.info.prompt_channels:
        return model
    net = create_model(model.info.architecture, in_chans=model.info.in_chans + PROMPT_CHANNELS,
                       num_classes=model.info.num_classes, **model.info.arch_kwargs)
    add_prompt_inputs(model.net, net)
    info = replace(model.info, prompt_channels=PROMPT_CHANNELS, tile_size=int(input_size), input_scale=1.0,
                   class_names=["background", "object"], inference={}, metrics={}, training={})
    return SegmentationModel(net.to(model.device).eval(), info, model.source, model.device)


def _clicked_batch(net, examples: List[Example], rounds: int, device) -> torch.Tensor:
    """The batch input after ``rounds`` simulated clicks, each fed the previous prediction."""
    for _ in range(rounds):
        x = _inputs(examples, device)
        with torch.no_grad():
            probs = torch.sigmoid(net(x))[:, 0].cpu().numpy()
        for example, prob in zip(examples, probs):
            prediction = prob > 0.5
            click = next_click(prediction, example.target)
            if click is not None:
                example.points.append(click)
            example.mask = prediction
    return _inputs(examples, device)


def _inputs(examples: List[Example], device) -> torch.Tensor:
    return torch.from_numpy(np.stack([np.concatenate([e.x, e.prompt_maps()]) for e in examples])).to(device)


def validation_objects(items: Dict[str, List[LabelledImage]], per_set: int, seed: int):
    """``per_set`` (image, object label) pairs from each folder, chosen once."""
    rng = np.random.default_rng(seed)
    chosen = []
    for name in sorted(items):
        pool = [(item, label) for item in items[name] for label in range(1, item.count + 1)]
        for i in rng.permutation(len(pool))[:per_set]:
            chosen.append(pool[int(i)])
    return chosen


def click_curve(model, image, target, clicks: int, start: Optional[np.ndarray] = None) -> List[float]:
    """IoU after each of ``clicks`` clicks of the simulated user, each click through ``refine``
    (starting from ``start``, the object's mask before the first click, or from nothing)."""
    prediction = np.zeros(target.shape, bool) if start is None else np.asarray(start, bool)
    points, curve = [], []
    for _ in range(clicks):
        click = next_click(prediction, target)
        if click is None:
            curve.append(1.0)
            continue
        points.append(click)
        try:
            prediction = refine(image, points=points, mask=prediction if prediction.any() else None, model=model)
        except ValueError:                      # negative clicks alone say nothing of where the object is
            prediction = np.zeros(target.shape, bool)
        curve.append(iou(prediction, target))
    return curve


def validate(model: SegmentationModel, objects, clicks: int) -> float:
    """Mean IoU over the first ``clicks`` clicks, over the validation objects."""
    return float(np.mean([np.mean(click_curve(model, item.image, item.objects == label, clicks))
                          for item, label in objects]))


def train_interactive(start, folders: Sequence, out, max_minutes: float, split: str = "train",
                      val_split: Optional[str] = "val", config: InteractiveConfig = InteractiveConfig(),
                      device="cpu", progress: Optional[Callable[[str], None]] = None,
                      cancel: Optional[Callable[[], bool]] = None, command: str = "",
                      overwrite: bool = True) -> Tuple[Path, float]:
    """Train a prompt-aware model from ``start`` on the objects of ``folders``; save the EMA
    weights that scored best on the validation objects to ``out`` (each better score replaces the
    last; ``overwrite=False``: a file at ``out`` made by anyone else is never replaced).
    Returns (out, best score)."""
    say = progress or (lambda text: None)
    rng = np.random.default_rng(config.seed)
    torch.manual_seed(config.seed)
    model = promptable_start(start, device, config.input_size)
    train_items = {str(f): load_labelled(f, split) for f in folders}
    val_items = {str(f): load_labelled(f, val_split) for f in folders} if val_split else {}
    val_objects = validation_objects(val_items, config.val_objects, config.seed) if val_items else []
    say(f"{sum(len(v) for v in train_items.values())} training images with "
        f"{sum(i.count for v in train_items.values() for i in v)} objects; {len(val_objects)} validation objects")
    net = model.net.train()
    average = WeightAverage(net, config.ema)
    optimizer = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    budget, begun = max_minutes * 60, time.monotonic()
    names = sorted(train_items)
    best, history, step, last_val, saved = -1.0, [], 0, begun, []
    in_chans = model.info.in_chans

    def evaluate_and_keep():
        nonlocal best
        kept = SegmentationModel(average.net, model.info, model.source, model.device)
        score = validate(kept, val_objects, config.val_clicks) if val_objects else float(step)
        history.append({"step": step, "minutes": round((time.monotonic() - begun) / 60, 2), "score": score})
        say(f"step {step}: mean IoU over {config.val_clicks} clicks {score:.4f}")
        if score > best:
            best = score
            info = replace(model.info, training={
                "interactive": True, "start": str(start), "data": [str(f) for f in folders], "split": split,
                "val_split": val_split, "steps": step, "minutes": round((time.monotonic() - begun) / 60, 1),
                "val_score": score, "val_metric": f"mean IoU over the first {config.val_clicks} clicks",
                "config": config.__dict__, "command": command, "history": list(history)})
            save_checkpoint(copy.deepcopy(average.net).cpu(), out, info, overwrite=bool(overwrite or saved))
            saved.append(out)

    while time.monotonic() - begun < budget and not (cancel and cancel()):
        for group in optimizer.param_groups:
            group["lr"] = config.lr * _schedule((time.monotonic() - begun) / budget, 0.03)
        examples = [simulate_example(_pick(train_items, names, rng), rng, config.input_size, in_chans)
                    for _ in range(config.batch_size)]
        net.eval()
        x = _clicked_batch(net, examples, int(rng.integers(0, config.max_rounds + 1)), model.device)
        net.train()
        y = torch.from_numpy(np.stack([e.target for e in examples]).astype(np.int64)).to(model.device)
        loss = segmentation_loss(net(x), y, 1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        average.update(net)
        step += 1
        if step % 20 == 0:
            say(f"step {step}, {(time.monotonic() - begun) / 60:.1f} min: loss {loss.item():.4f}")
        if time.monotonic() - last_val > config.validate_every_minutes * 60:
            evaluate_and_keep()
            last_val = time.monotonic()
    evaluate_and_keep()
    return Path(out), best


def _pick(items: Dict[str, List[LabelledImage]], names: List[str], rng) -> LabelledImage:
    """A folder first (so that one with many images does not crowd the others out), then an image."""
    pool = items[names[int(rng.integers(len(names)))]]
    return pool[int(rng.integers(len(pool)))]
