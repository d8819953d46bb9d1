"""Training and fine-tuning: Dice + cross-entropy, AdamW with warm-up and cosine decay,
validation Dice after epochs (the images segmented as the trained model will segment them;
every epoch unless validating costs more than half as much as training: see
``validation_due``) with the best weights kept, stop by epochs or minutes.
"""
import copy
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import __version__
from ..models import list_models
from .appearance import pairs_profile
from . import ddp
from .checkpoint import CheckpointError, check_input_scale, save_checkpoint
from .imageio import check_target
from .imageio import DataError
from .datasets import IGNORE_INDEX, SegmentationDataset, augmentation, check_pair, find_pairs, pairs_matching
from .defaults import FEW_SHOT
from .infer import Cancelled, segment
from .instances import decode_distance, decode_targets, instance_pair
from .metrics import instance_scores, mean_dice
from .preprocess import window_normalization
from .model import SegmentationModel, load_model, with_instances


@dataclass
class TrainConfig:
    """Defaults are for few-shot fine-tuning on a laptop CPU (see README, "Fine-tuning defaults")."""
    epochs: Optional[int] = None          # None: run until max_minutes
    max_minutes: Optional[float] = None
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_fraction: float = 0.05
    batch_size: int = 8
    patch_size: int = 256
    samples_per_epoch: Optional[int] = None   # default: the number of training images, at least 4 batches
    augment: bool = True
    augment_strength: float = 1.0         # data.augmentation: 0 = flips and rotations only, 1 = defaults
    val_fraction: float = 0.15            # held out when no validation data is given
    seed: int = 0
    num_workers: Optional[int] = None     # None: 0 on Windows/macOS, else 1
    dice_weight: float = 0.5
    input_scale: Optional[float] = None   # None: the model's own (1.0 for a bare architecture)
    freeze: str = "none"                  # see FREEZE_CHOICES
    foreground: float = 1 / 3             # fraction of crops placed on a foreground pixel
    ema: float = 0.0                      # decay of the weight average validated and kept; 0 = off
    blend: float = 1.0                    # the best epoch's share of the kept weights, the rest the trained
                                          # start's (with validation data, only if it scores as high as the epoch)
    instances: str = ""                   # "border": make a binary model an instance model (engine/instances.py)
    window: Any = None                    # intensity window (a CT preset name or (level, width)), recorded in
                                          # the checkpoint; None: the model's own; "percentiles": none

    @classmethod
    def few_shot(cls, **overrides) -> "TrainConfig":
        """Defaults for fine-tuning a trained model on a few corrected images (engine/defaults.py).

        A trained model needs a gentler step than training from scratch (1e-3); batches of 4
        patches of 256 fit a laptop CPU; 16 patches per epoch give a validation point, and a
        chance to keep the best model, every few seconds to a minute even with 1-5 images."""
        return cls(**{**FEW_SHOT, **overrides})


FREEZE_CHOICES = {
    "none": "every layer trains",
    "norm_stats": "every weight trains; BatchNorm running statistics stay as they are",
    "encoder": "the encoder (weights and statistics) stays as it is; decoder and head train",
}


@dataclass
class EpochRecord:
    epoch: int
    loss: float
    val_dice: Optional[float]
    lr: float
    seconds: float


@dataclass
class TrainProgress:
    """Passed to ``progress``: after every step (val_dice None) and after every epoch (with
    its validation Dice, or None when that epoch was not validated: see ``validation_due``).
    Before the first step, when the starting weights were trained and there is validation
    data, once as epoch 0 with their validation Dice (loss NaN: nothing trained yet)."""
    epoch: int
    epochs: Optional[int]
    step: int
    steps_per_epoch: int
    loss: float
    elapsed: float
    fraction: float                       # of the planned work, 0..1
    val_dice: Optional[float] = None


@dataclass
class TrainResult:
    model: SegmentationModel              # the best weights (by validation Dice)
    history: List[EpochRecord] = field(default_factory=list)
    best_epoch: int = 0                   # 0: no epoch beat the starting weights, which were kept
    blend: float = 1.0                    # the best epoch's share of the kept weights, the start's the rest
                                          # (cfg.blend, where the start was trained and the blend
                                          # scored at least as high as the epoch alone; else 1)
    blend_val_dice: Optional[float] = None   # of that blend, when it was made and validated (kept or not)
    best_val_dice: Optional[float] = None
    start_val_dice: Optional[float] = None   # of the starting weights (a trained start, with validation data)
    path: Optional[Path] = None
    cancelled: bool = False
    minutes: float = 0.0
    moved: str = ""                       # why ``path`` is not the ``out`` asked for (it was taken, or unwritable)


class TrainingDiverged(ValueError):
    """The loss became NaN or infinite: the weights are lost, and nothing was saved."""


class WeightsNotSaved(CheckpointError):
    """Training finished, but its weights could be written nowhere (``out``, the temporary
    folder, the home folder and the working folder all refused).  ``model`` holds them and
    ``result`` the run, so that a caller that lives on (the Fine-tune widget) can save them
    once the user names a place that works."""

    def __init__(self, message: str):
        super().__init__(message)
        self.model = None
        self.result = None



def train(model_or_name, data, out=None, epochs=None, max_minutes=None, device="auto",
          progress: Optional[Callable[[TrainProgress], None]] = None, cancel: Optional[Callable[[], bool]] = None,
          *, split: Optional[str] = None, val_data=None, val_split: Optional[str] = None,
          val_include: Optional[Sequence[str]] = None, config: Optional[TrainConfig] = None,
          command: str = "", overwrite: bool = True) -> TrainResult:
    """Train or fine-tune ``model_or_name`` (shipped name, checkpoint path, architecture, or loaded model).

    ``data``: a dataset folder (``images/`` + ``masks/``, optional ``splits.json``; ``split`` picks a
    part) or a list of (image, mask) arrays.  Validation data: ``val_data``/``val_split``, else a
    held-out part of ``data``; ``val_include`` keeps the validation pairs whose stem matches one
    of its patterns (e.g. ``["benign_*", "malignant_*"]``: rank epochs on the images a target
    scores).  Stops after ``epochs`` or ``max_minutes`` (whichever comes first;
    with neither, 20 epochs), or when ``cancel()`` returns True; the best weights are kept either way
    and saved to ``out`` (a ``.safetensors`` path) when given.  Starting from trained weights, the
    best epoch's are blended with them as ``config.blend`` says (WiSE-FT: that share of the
    epoch's, the rest the start's); with validation data the start, the blend and the epoch
    alone are all candidates and the highest-scoring is kept (ties to the start, then the
    blend; the start kept is ``best_epoch`` 0).  The start is validated before the first step
    and reported to ``progress`` as epoch 0; cancelled then, ``train`` raises
    :class:`.infer.Cancelled` and saves nothing.

    ``out`` is checked before the first step (a .safetensors name in a writable folder with room
    for the checkpoint).  With ``overwrite=False`` a file at ``out`` is never replaced, also one
    made while training ran: the weights then go to a free name beside it (``NAME.1.safetensors``
    ...), and if ``out``'s folder cannot be written at the end (a full disk) to the temporary
    folder; ``TrainResult.moved`` says why.  A loss that becomes NaN or infinite stops training
    with :class:`TrainingDiverged`, and nothing is saved.
    """
    cfg = copy.deepcopy(config) if config is not None else TrainConfig()
    cfg.epochs = epochs if epochs is not None else cfg.epochs
    cfg.max_minutes = max_minutes if max_minutes is not None else cfg.max_minutes
    if cfg.epochs is None and cfg.max_minutes is None:
        cfg.epochs = 20
    check_config(cfg)
    if out is not None:
        out = _check_out(out)
        if not overwrite and out.exists():
            raise FileExistsError(f"{out} exists; pass overwrite=True to replace it, or choose another out")
    if cfg.input_scale is not None:
        cfg.input_scale = check_input_scale(cfg.input_scale)
    window_normalization(cfg.window)                            # a bad window fails before any work
    if cfg.freeze not in FREEZE_CHOICES:
        raise ValueError(f"freeze={cfg.freeze!r}: use one of " + "; ".join(f"{k!r} ({v})" for k, v in FREEZE_CHOICES.items()))
    augment_ranges = augmentation(cfg.augment_strength)         # checked before any data is read
    if not 0 <= cfg.foreground <= 1:
        raise ValueError(f"foreground={cfg.foreground!r}: a fraction of the training crops, in [0, 1]")
    if not 0 < cfg.blend <= 1:
        raise ValueError(f"blend={cfg.blend!r}: the best epoch's share of the kept weights, in (0, 1] "
                         "(the rest from the trained starting weights; 1 = the epoch alone)")
    if not 0 <= cfg.ema < 1:
        raise ValueError(f"ema={cfg.ema!r}: the decay of the weight average per step, in [0, 1) "
                         "(e.g. 0.995 averages over about 200 steps; 0 switches it off)")
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    ranks = ddp.setup(device)             # run by torchrun: one rank of several (engine/ddp.py)
    try:
        return _train(model_or_name, data, out, device if ranks is None else ranks.device, progress, cancel,
                      split, val_data, val_split, val_include, cfg, command, overwrite, ranks)
    finally:
        if ranks is not None:
            ranks.close()


def _train(model_or_name, data, out, device, progress, cancel, split, val_data, val_split, val_include, cfg,
           command, overwrite, ranks: Optional["ddp.Distributed"]) -> TrainResult:
    # Several ranks take the same steps: what depends on a clock or a user is rank 0's (engine/ddp.py).
    agree = ranks.from_main if ranks is not None else (lambda *values: values)
    main = ranks is None or ranks.main
    augment_ranges = augmentation(cfg.augment_strength)
    model = load_model(model_or_name, device=device)
    if model.info.prompt_channels:
        raise ValueError(f"{model.name} is a prompt-aware model (click to fix): it learns from clicks, not whole "
                         "masks; train it with medrwkv train --interactive")
    model = SegmentationModel(copy.deepcopy(model.net), copy.deepcopy(model.info), model.source, model.device)
    if cfg.instances:
        model = with_instances(model, cfg.instances)
    train_items, val_items = _split_items(data, split, val_data, val_split, cfg)
    _check_apart(train_items, val_items, data, split, val_data, val_split)
    if val_include:
        val_items = pairs_matching(val_items, val_include, f"the validation pairs of {val_data or data}",
                                   "val_include")
    # What the training images look like, so that the app can suggest this model for images like them.
    profile = pairs_profile(train_items, model.info.num_classes)
    info = model.info
    if cfg.input_scale is not None:
        info.input_scale = cfg.input_scale
    if cfg.window is not None:            # recorded: segment uses it with this model unless told otherwise
        info.normalization = window_normalization(cfg.window)
    train_set = SegmentationDataset(train_items, info.in_chans, info.num_classes, cfg.patch_size, augment=cfg.augment,
                                    samples_per_epoch=cfg.samples_per_epoch or max(len(train_items), 4 * cfg.batch_size),
                                    seed=cfg.seed, input_scale=info.input_scale, foreground=cfg.foreground,
                                    instances=bool(info.instances), window=info.window, **augment_ranges)
    # Read once, checked as training pairs are, and segmented whole as the trained model will be.
    val_pairs = [instance_pair(item) if info.instances else check_pair(item, info.num_classes)
                 for item in val_items] or None
    info.tile_size = max(info.tile_size, cfg.patch_size)
    sampler = ranks.sampler(train_set, cfg.seed) if ranks is not None else None    # each rank its share
    loader = torch.utils.data.DataLoader(
        train_set, batch_size=min(cfg.batch_size, len(train_set if sampler is None else sampler)),
        shuffle=sampler is None, sampler=sampler, drop_last=True,
        num_workers=_workers(cfg), generator=torch.Generator().manual_seed(cfg.seed),
        persistent_workers=_workers(cfg) > 0, worker_init_fn=_ignore_interrupts)

    if out is not None:
        _check_room(out, model.net)
    layout = _memory_format(model.device)
    net = model.net.to(memory_format=layout)
    fixed = _fixed_modules(net, cfg.freeze, info.architecture)
    if cfg.freeze == "encoder":
        for module in fixed:
            module.requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=cfg.lr,
                                  weight_decay=cfg.weight_decay)
    stepped = ranks.wrap(net) if ranks is not None else net         # DDP averages the ranks' gradients
    amp_dtype = _amp_dtype(model.device)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    steps_per_epoch = len(loader)
    planned_steps = cfg.epochs * steps_per_epoch if cfg.epochs else None
    budget = cfg.max_minutes * 60 if cfg.max_minutes else None

    average = WeightAverage(net, cfg.ema) if cfg.ema else None
    kept = average.net if average is not None else net        # what is validated and kept
    result = TrainResult(model=model)
    best_state, best_dice = None, float("-inf")       # without validation data the score is -loss, any size
    start, step, epoch = time.monotonic(), 0, 0
    # Trained starting weights are blended into the best epoch's and, given validation data, are
    # a candidate themselves (see _keep_or_blend).
    start_state = {k: v.detach().clone() for k, v in kept.state_dict().items()} if _starts_trained(model) else None
    val_seconds = 0.0             # how long one validation takes: time kept back from the budget for the last
    if start_state is not None and val_pairs is not None and main:
        val_start = time.monotonic()
        result.start_val_dice = validate(kept, val_pairs, model, cancel)     # cancelled: nothing trained, nothing saved
        val_seconds = time.monotonic() - val_start
        if progress is not None:
            progress(TrainProgress(0, cfg.epochs, 0, steps_per_epoch, float("nan"), time.monotonic() - start, 0.0,
                                   result.start_val_dice))
    last_val_seconds, trained_since_val = None, 0.0
    stop = False
    # The budget covers the whole run: training stops early enough for the last validation (and,
    # from trained weights, that of the blend) to end within it.
    validations_at_end = 0 if val_pairs is None else 2 if start_state is not None and cfg.blend < 1 else 1

    def out_of_time() -> bool:
        return bool(budget) and time.monotonic() - start + validations_at_end * val_seconds >= budget

    while not stop:
        epoch += 1
        epoch_start, losses = time.monotonic(), []
        train_set.set_epoch(epoch)
        if sampler is not None:
            sampler.set_epoch(epoch)
        _train_mode(net, fixed)
        for x, y in loader:
            fraction, = agree(_fraction(step, planned_steps, time.monotonic() - start, budget))
            lr = cfg.lr * _schedule(fraction, cfg.warmup_fraction)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss = _step(stepped, optimizer, scaler, amp_dtype, x.to(model.device, memory_format=layout),
                         y.to(model.device), info.num_classes, cfg.dice_weight, info.instances)
            if not math.isfinite(loss):
                raise TrainingDiverged(
                    f"training diverged at epoch {epoch}, step {step + 1}: the loss is {loss}, so the weights are lost; "
                    f"nothing was saved. Lower the learning rate (it was {cfg.lr:g}) and train again")
            losses.append(loss)
            step += 1
            if ranks is not None:
                ranks.check_same(net, step)
            if average is not None:
                average.update(net)
            if progress is not None:
                progress(TrainProgress(epoch, cfg.epochs, step - (epoch - 1) * steps_per_epoch, steps_per_epoch, loss,
                                       time.monotonic() - start, fraction))
            asked, timed_out = agree(bool(cancel is not None and cancel()), out_of_time())
            if asked or timed_out:
                stop, result.cancelled = True, bool(asked)
                break
        finishing = stop or bool(cfg.epochs and epoch >= cfg.epochs) or out_of_time()
        trained_since_val += time.monotonic() - epoch_start
        val_dice = None
        # Cancelled with weights already validated (an epoch or the start): those are kept at once,
        # the epoch cut short is not validated, and a validation under way stops at the next tile.
        validated = best_state is not None or result.start_val_dice is not None
        if val_pairs is not None and main and validation_due(trained_since_val, last_val_seconds, finishing) \
                and not (result.cancelled and validated):
            val_start = time.monotonic()
            try:
                val_dice = validate(kept, val_pairs, model, cancel if validated else None)
                last_val_seconds, trained_since_val = time.monotonic() - val_start, 0.0
                val_seconds = max(val_seconds, last_val_seconds)
            except Cancelled:
                stop, result.cancelled = True, True
        score = -float(np.mean(losses)) if val_pairs is None else val_dice
        if score is not None and score > best_dice:
            best_dice, result.best_epoch = score, epoch
            best_state = {k: v.detach().clone() for k, v in kept.state_dict().items()}
        result.history.append(EpochRecord(epoch, float(np.mean(losses)), val_dice, lr, time.monotonic() - epoch_start))
        if progress is not None:
            progress(TrainProgress(epoch, cfg.epochs, steps_per_epoch, steps_per_epoch, float(np.mean(losses)),
                                   time.monotonic() - start, _fraction(step, planned_steps, time.monotonic() - start, budget),
                                   val_dice))
        # Time spent validating counts too: once the budget is gone, no further epoch (it would
        # train one step and validate again, past the user's limit).  An epoch that was not
        # validated is not the last: the next one, cut short, is validated.
        if finishing or (out_of_time() and (val_pairs is None or val_dice is not None)) or result.cancelled:
            stop = True
        stop, cancelled = agree(stop, result.cancelled)
        stop, result.cancelled = bool(stop), bool(cancelled)

    if not main:                  # rank 0 chooses, blends and saves the weights, all ranks hold
        ranks.barrier()
        return result

    if start_state is not None:
        best_state, best_dice = _keep_or_blend(kept, val_pairs, model, start_state, best_state, best_dice, cfg.blend,
                                               result)
    if best_state is None:        # cannot happen with finite losses; never save the last weights unchecked
        raise TrainingDiverged("training kept no weights (no epoch scored); nothing was saved")
    bad = [k for k, v in best_state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise TrainingDiverged(f"the trained weights hold NaN or infinite values ({bad[0]}, ...); nothing was saved. "
                               f"Lower the learning rate (it was {cfg.lr:g}) and train again")
    net.load_state_dict(best_state)
    net.eval().requires_grad_(True)
    result.best_val_dice = best_dice if val_pairs is not None else None
    result.minutes = (time.monotonic() - start) / 60
    model.info.training = _provenance(model, data, split, val_split, val_include, cfg, result, command)
    model.info.training["appearance"] = profile
    model.info.metrics = {"val_dice": result.best_val_dice} if result.best_val_dice is not None else {}
    model.source = str(out) if out is not None else model.source
    model._fused = None
    if out is not None:
        try:
            result.path, result.moved = save_trained(net, out, model.info, overwrite)
        except WeightsNotSaved as exc:
            exc.model, exc.result = model, result
            raise
        finally:
            if ranks is not None:
                ranks.barrier()
        model.source = str(result.path)
    elif ranks is not None:
        ranks.barrier()
    return result


def save_trained(net: nn.Module, out: Path, info, overwrite: bool) -> Tuple[Path, str]:
    """Save trained weights to ``out``, or, where that fails, somewhere they are not lost.

    ``overwrite=False`` and ``out`` taken (by another run, while this one trained): a free
    name beside it, ``NAME.1.safetensors``, ``NAME.2.safetensors`` ...  ``out``'s folder not
    writable (a full disk, a folder made read-only or unplugged): the same names in the
    temporary folder, else the home folder, else the working folder.  Returns (the path
    written, why it is not ``out``, or ""); :class:`WeightsNotSaved` when no place took them."""
    out = Path(out)
    try:
        return Path(save_checkpoint(net, out, info, overwrite=overwrite)), ""
    except FileExistsError:
        why, folders = f"{out} was made by someone else while training ran, and was left as it is", [out.parent]
    except CheckpointError as exc:
        why, folders = f"{exc}", _rescue_folders()
    failures = []
    for folder in folders:
        try:
            return _save_under_free_name(net, out, info, folder), why
        except CheckpointError as exc:
            failures.append(str(exc))
    raise WeightsNotSaved(f"{why}; nor could the weights be saved elsewhere ({'; '.join(failures)}): "
                          "nothing was saved")


def _rescue_folders() -> List[Path]:
    """Where finished weights go when ``out``'s folder refuses them, in order, each once."""
    folders = []
    for where in (tempfile.gettempdir, Path.home, Path.cwd):
        try:
            folder = Path(where()).resolve()
        except (OSError, RuntimeError):   # a working folder that was deleted, no home folder
            continue
        if folder not in folders:
            folders.append(folder)
    return folders


def _save_under_free_name(net: nn.Module, out: Path, info, folder: Path) -> Path:
    """``folder/NAME.N.safetensors`` for the first free N, never replacing a file."""
    for n in range(1, 1000):
        candidate = folder / f"{out.stem}.{n}{out.suffix}"
        if candidate.exists():
            continue
        try:
            return Path(save_checkpoint(net, candidate, info, overwrite=False))
        except FileExistsError:
            continue
    raise CheckpointError(f"no free name for {out.name} in {folder}")


def check_config(cfg: "TrainConfig") -> None:
    """A ValueError naming the setting when a number of ``cfg`` is out of its range (before any work)."""
    def number(name, low, high=math.inf, integer=False, low_open=False, high_open=True, optional=False):
        value = getattr(cfg, name)
        if value is None and optional:
            return
        kind = "a whole number" if integer else "a number"
        ok = (not isinstance(value, bool) and isinstance(value, (int, float))
              and (not integer or float(value).is_integer()) and math.isfinite(value)
              and (value > low if low_open else value >= low) and (value < high if high_open else value <= high))
        if not ok:
            span = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
            raise ValueError(f"{name}={value!r}: must be {kind} in {span}")
    number("epochs", 1, integer=True, optional=True)
    number("max_minutes", 0, low_open=True, optional=True)
    number("lr", 0, low_open=True)
    number("weight_decay", 0)
    number("warmup_fraction", 0, 1, high_open=False)
    number("batch_size", 1, integer=True)
    number("patch_size", 16, integer=True)
    number("samples_per_epoch", 1, integer=True, optional=True)
    number("augment_strength", 0)
    number("val_fraction", 0, 1, low_open=True)
    number("seed", 0, 2 ** 32, integer=True)
    number("num_workers", 0, integer=True, optional=True)
    number("dice_weight", 0, 1, high_open=False)


def _keep_or_blend(kept, val_pairs, model, start_state, epoch_state, epoch_dice, blend, result):
    """The weights to keep when training started from trained ones: the best epoch's blended with
    the start's (``blend`` of the epoch).  With validation data the epoch alone is kept instead
    when it scores higher than the blend, and the start when it scores at least as high as
    either (then ``result.best_epoch`` is 0).  Returns (state, its validation score)."""
    state, dice = epoch_state, epoch_dice
    if state is None:             # cancelled before an epoch was validated: the start is what was
        result.best_epoch, result.blend = 0, 1.0
        return start_state, result.start_val_dice
    if blend < 1 and not (result.cancelled and val_pairs is not None):   # cancelled: no further validation
        blended = {k: start_state[k].lerp(v, blend) if v.is_floating_point() else v for k, v in epoch_state.items()}
        if val_pairs is None:
            state, result.blend = blended, blend
        else:
            kept.load_state_dict(blended)
            result.blend_val_dice = validate(kept, val_pairs, model)
            # The blend is the better bet on average, not always: where the start knows nothing of
            # the images (the polyp model on bright-field nuclei) it lost 0.04-0.12 against the
            # epoch alone, and one held-out slide showed it every time (bench/RESULTS.md,
            # "Few-shot fine-tuning", 2026-11-25).
            if result.blend_val_dice >= epoch_dice:
                state, dice, result.blend = blended, result.blend_val_dice, blend
    # The starting weights are a candidate too: a fine-tuning that scores lower on the validation
    # images gives them back rather than a worse model.  (The shipped polyp and ultrasound models,
    # three few-shot minutes on ten more images of their own kind: 0.06-0.13 Dice lower on others.)
    if result.start_val_dice is not None and result.start_val_dice >= dice:
        state, dice, result.best_epoch, result.blend = start_state, result.start_val_dice, 0, 1.0
    return state, dice


class WeightAverage:
    """An exponential moving average of a network's weights and BatchNorm statistics
    (Polyak averaging, as timm's ModelEma): ``avg = d * avg + (1 - d) * new`` after every
    step, with ``d = min(decay, (1 + n) / (10 + n))`` at the n-th update so that a short run
    is not dominated by its starting point.  The averaged copy (``net``, eval mode) is what
    gets validated and kept: it is smoother than the last step's weights.
    """

    def __init__(self, net: nn.Module, decay: float):
        self.decay, self.updates = float(decay), 0
        self.net = copy.deepcopy(net).eval().requires_grad_(False)

    def update(self, net: nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        with torch.no_grad():
            for avg, new in zip(self.net.state_dict().values(), net.state_dict().values()):
                if avg.is_floating_point():
                    avg.lerp_(new.detach(), 1 - d)
                else:                       # counters such as num_batches_tracked
                    avg.copy_(new)


def _fixed_modules(net: nn.Module, freeze: str, architecture: str) -> List[nn.Module]:
    """The modules that stay in eval mode (and, for "encoder", keep their weights) while training."""
    if freeze == "none":
        return []
    if freeze == "norm_stats":
        return [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    parts = getattr(net, "encoder_parts", None)
    if not parts:
        raise ValueError(f"freeze='encoder': {architecture} does not say which of its parts is the encoder; "
                         "use freeze='none' or 'norm_stats'")
    return [getattr(net, name) for name in parts]


def _train_mode(net: nn.Module, fixed: List[nn.Module]) -> None:
    net.train()
    for module in fixed:
        module.eval()


#: Validation runs once the training since the last one took this many times as long as that
#: validation, so it takes at most a third of the time.  Whole-image validation of a few large
#: images (five 1024² slides) costs as much as a few-shot epoch of 16 patches; with small
#: validation images (the shipped models' runs) every epoch is still validated.
VALIDATION_SPACING = 2.0


def _starts_trained(model: SegmentationModel) -> bool:
    """Whether the weights training starts from were trained (a shipped model, a checkpoint, or a
    model trained in memory, which keeps its architecture name as source), not freshly
    initialised from an architecture name."""
    return model.source not in list_models() or bool(model.info.training)


def validation_due(trained_seconds: float, last_validation_seconds: Optional[float], finishing: bool) -> bool:
    """Whether to validate after this epoch: always after the first and the last, else once
    ``trained_seconds`` (since the last validation) reach ``VALIDATION_SPACING`` times the
    duration of that validation."""
    return (finishing or last_validation_seconds is None
            or trained_seconds >= VALIDATION_SPACING * last_validation_seconds)


def validate(net, val_pairs, model: SegmentationModel, cancel: Optional[Callable[[], bool]] = None) -> float:
    """Mean Dice over ``val_pairs`` ((image, mask) arrays, as :func:`.data.check_pair` gives
    them), each image segmented as the trained model will segment it: :func:`.infer.segment`
    with ``model.info``'s input scale, tile size and inference settings (flips, threshold,
    largest object), scored at the image's own size, so the same as :func:`.evaluate.evaluate`
    scores it.  An inference copy of ``net`` (BatchNorm folded) does the work; ``net`` itself
    is not touched.  ``cancel()`` returning True raises :class:`.infer.Cancelled`."""
    # Epochs, the start and the blend are compared by what the user will get: a calibrated
    # model (e.g. threshold 0.3 and one object per image) ranks weights differently from logits > 0.
    judged = SegmentationModel(net, model.info, model.source, model.device)
    if model.info.instances:      # an instance model is ranked by what it is for: the DSB2018 score
        return float(np.mean([instance_scores(segment(image, model=judged, cancel=cancel), labels)["dsb"]
                              for image, labels in val_pairs]))
    return float(np.mean([mean_dice(segment(image, model=judged, cancel=cancel), mask, model.info.num_classes)
                          for image, mask in val_pairs]))


def segmentation_loss(logits, target, num_classes: int, dice_weight: float = 0.5, instances: str = ""):
    """(1 - dice_weight) * cross-entropy + dice_weight * soft Dice; pixels labelled -1 are ignored.
    An instance model's target is encoded (engine/instances.py): the same loss on its foreground
    and on its touching-border or distance channel (soft targets: BCE and soft Dice take them), added."""
    if instances:
        foreground, border, valid = decode_targets(target)
        second = decode_distance(target).float() if instances == "distance" else border
        return sum(_binary_loss(logits[:, c], truth, valid, dice_weight)
                   for c, truth in enumerate((foreground, second)))
    valid = target != IGNORE_INDEX
    if num_classes == 1:
        logit = logits[:, 0]
        truth = (target > 0).float()
        ce = F.binary_cross_entropy_with_logits(logit[valid], truth[valid]) if valid.any() else logit.sum() * 0
        probs = torch.sigmoid(logit) * valid
        soft_dice = _soft_dice(probs[:, None], (truth * valid)[:, None])
    else:
        ce = F.cross_entropy(logits, target.clamp(min=0).masked_fill(~valid, IGNORE_INDEX),
                             ignore_index=IGNORE_INDEX)
        probs = torch.softmax(logits, 1) * valid[:, None]
        onehot = F.one_hot(target.clamp(min=0), num_classes).permute(0, 3, 1, 2).float() * valid[:, None]
        soft_dice = _soft_dice(probs[:, 1:], onehot[:, 1:])
    return (1 - dice_weight) * ce + dice_weight * (1 - soft_dice)


def _binary_loss(logit, truth, valid, dice_weight):
    truth = truth.float()
    ce = F.binary_cross_entropy_with_logits(logit[valid], truth[valid]) if valid.any() else logit.sum() * 0
    soft_dice = _soft_dice((torch.sigmoid(logit) * valid)[:, None], (truth * valid)[:, None])
    return (1 - dice_weight) * ce + dice_weight * (1 - soft_dice)


def _soft_dice(probs, truth, eps: float = 1.0):
    # Summed over the batch per class so that empty images do not dominate.
    dims = (0, 2, 3)
    overlap = (probs * truth).sum(dims)
    return ((2 * overlap + eps) / (probs.sum(dims) + truth.sum(dims) + eps)).mean()


def _step(net, optimizer, scaler, amp_dtype, x, y, num_classes, dice_weight, instances="") -> float:
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(device_type=x.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        logits = net(x)
    loss = segmentation_loss(logits.float(), y, num_classes, dice_weight, instances)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_(net.parameters(), 5.0)
    scaler.step(optimizer)
    scaler.update()
    return float(loss.detach())


def _schedule(fraction: float, warmup: float) -> float:
    """Linear warm-up, then cosine decay to 1% of the peak."""
    if fraction < warmup:
        return max(fraction / warmup, 0.01)
    t = min((fraction - warmup) / max(1 - warmup, 1e-8), 1.0)
    return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * t))


def _fraction(step, planned_steps, elapsed, budget) -> float:
    parts = []
    if planned_steps:
        parts.append(step / planned_steps)
    if budget:
        parts.append(elapsed / budget)
    return min(max(parts), 1.0)


def _memory_format(device: torch.device):
    # oneDNN's and cuDNN's native layout: measured 15-20% faster CPU training steps
    # (rwkv_unet_t, batch 8, 128 px), mostly the depthwise convolutions' backward.
    return torch.channels_last if device.type in ("cpu", "cuda") else torch.contiguous_format


def _amp_dtype(device: torch.device):
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _ignore_interrupts(worker_id: int) -> None:
    """In a loader process: Ctrl+C reaches every process of a terminal; the main process decides
    (``cancel``) and stops the workers, which must not die first and take the epoch with them."""
    import signal
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _workers(cfg: TrainConfig) -> int:
    if cfg.num_workers is not None:
        return cfg.num_workers
    # Worker processes are fragile on spawn-based platforms (notebooks, frozen apps).
    return 0 if sys.platform in ("win32", "darwin") else min(1, (os.cpu_count() or 1) - 1)


def _check_out(out) -> Path:
    """``out`` as a Path, or an error naming it when a checkpoint could not be written there:
    not a .safetensors name, a folder, under a file, in a missing or unwritable folder."""
    out = Path(out).expanduser()
    if out.suffix != ".safetensors":
        raise ValueError(f"out={str(out)!r}: checkpoints are .safetensors files; name it e.g. {out.stem}.safetensors")
    try:
        check_target(out)
    except FileNotFoundError:
        raise ValueError(f"out={str(out)!r}: the folder {out.parent} does not exist; create it first.") from None
    except OSError as exc:
        raise ValueError(f"out={str(out)!r}: {exc.filename} {exc.strerror}") from None
    try:                                    # a read-only or foreign folder, found now and not after training
        with tempfile.TemporaryFile(dir=out.parent or "."):
            pass
    except OSError as exc:
        raise ValueError(f"out={str(out)!r}: cannot write in {out.parent} ({exc.strerror}); choose a folder you "
                         "can write to") from None
    return out


def _check_room(out: Path, net: nn.Module) -> None:
    """An error before training when ``out``'s disk has no room for the checkpoint (float16 weights)."""
    need = sum(t.numel() * min(t.element_size(), 2) for t in net.state_dict().values()) + (1 << 20)
    free = shutil.disk_usage(out.parent if str(out.parent) else ".").free
    if free < 2 * need:
        raise ValueError(f"out={str(out)!r}: {free / 2**20:.1f} MiB free in {out.parent}, and the checkpoint needs "
                         f"about {need / 2**20:.1f} MiB; free some space or choose another folder")


def _split_items(data, split, val_data, val_split, cfg: TrainConfig):
    """Training and validation items: Pairs from folders, or (image, mask) arrays."""
    if isinstance(data, (str, os.PathLike)):
        items = find_pairs(data, split)
        if val_data is None and val_split is not None:
            return items, find_pairs(data, val_split)
    else:
        items = list(data)
    if not items:
        raise ValueError("train: no training images")
    if val_data is not None:
        val = find_pairs(val_data, val_split) if isinstance(val_data, (str, os.PathLike)) else list(val_data)
        return items, val
    if len(items) < 2:
        return items, []
    order = np.random.default_rng(cfg.seed).permutation(len(items))
    n_val = max(1, int(round(cfg.val_fraction * len(items))))
    return [items[i] for i in order[n_val:]], [items[i] for i in order[:n_val]]


def _check_apart(train_items, val_items, data, split, val_data, val_split) -> None:
    """A DataError when two splits of one splits.json share an image: its score would rank
    epochs by what they memorised, and the kept model would be chosen on its training data."""
    if not (isinstance(data, (str, os.PathLike)) and val_data is None and val_split is not None):
        return        # validation data given apart (val_data=) is the caller's choice, even the same folder

    def key(item):
        return Path(item.image).resolve()
    shared = {key(i) for i in train_items} & {key(i) for i in val_items}
    if shared:
        where = Path(data) / "splits.json"
        names = sorted(p.stem for p in shared)
        if split is None:
            raise DataError(f"training on every pair of {data} includes the validation split {val_split!r} of {where} "
                            f"({len(shared)} images); name the training split too (split=, --split)")
        raise DataError(f"{len(shared)} image(s) are in both the training split {split or '(all pairs)'!r} and the "
                        f"validation split {val_split or '(given)'!r} of {where}: {', '.join(names[:5])}"
                        f"{', ...' if len(names) > 5 else ''}; a validation image must not be trained on, so "
                        "remove them from one of the two")


def _provenance(model, data, split, val_split, val_include, cfg, result, command) -> dict:
    return {
        "base": model.source,
        "data": str(data) if isinstance(data, (str, os.PathLike)) else f"{len(data)} in-memory pairs",
        "split": split, "val_split": val_split, "val_include": list(val_include) if val_include else None,
        "epochs": len(result.history), "best_epoch": result.best_epoch, "blend": result.blend,
        "blend_val_dice": result.blend_val_dice,
        "start_val_dice": result.start_val_dice,
        "minutes": round(result.minutes, 2), "device": str(model.device),
        "config": {k: v for k, v in cfg.__dict__.items()},
        "history": [r.__dict__ for r in result.history],
        "command": command, "cancelled": result.cancelled,
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "version": __version__,
    }
