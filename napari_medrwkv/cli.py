"""``medrwkv``: the engine on the command line.

    medrwkv models
    medrwkv segment --model M|auto [--device D] [--tile N] [--flips] [--threshold P] [--largest-component] INPUT... --out DIR
        [--workers N | --scheduler ADDRESS | --scheduler-file F] [--block N] [--resume]
    medrwkv train --model M --data DIR [--split train] [--val-split val] [--epochs N] [--max-minutes X] --out FILE
    medrwkv evaluate --model M --data DIR [--split test] [--device D] [--flips] [--json] [--record]
    medrwkv calibrate --model M --data DIR [--split val] [--try-flips] --out FILE
    medrwkv average CHECKPOINT CHECKPOINT... [--shares 0.5,0.5] --out FILE
    medrwkv appearance --model M --data DIR [--split train]

``--flips``, ``--threshold`` and ``--largest-component`` (and their ``--no-`` forms) override
the checkpoint's own inference settings, which ``calibrate`` chooses.
"""
import argparse
import errno
import json
import math
import os
import shlex
import signal
import sys
import threading
from collections import Counter
from pathlib import Path

from .engine.defaults import CALIBRATION_THRESHOLDS
from .engine.memory import retain_freed_memory

AUTO = "auto"                # segment --model auto: each image gets the model suggested for it
FLIPS_HELP = ("test-time augmentation: average the probabilities over the image and its left-right, "
              "up-down and double flips (4x the time); default: the checkpoint's setting")
THRESHOLD_HELP = "binary models: foreground where its probability is above this (default: the checkpoint's, 0.5 unless calibrated)"
LARGEST_HELP = "binary models: keep only the largest object of each image or slice (default: the checkpoint's setting)"


def main(argv=None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)      # the run's provenance
    retain_freed_memory()        # before any thread starts, so that every one shares the kept memory
    restore = _terminate_as_interrupt()
    try:
        return args.run(args)
    except (Exception, KeyboardInterrupt) as err:
        _LazyBar.close_all()            # the message gets a line of its own
        return _report(args.command, err)
    finally:
        restore()


def _report(command: str, err: BaseException) -> int:
    """A failure as one line on stderr; returns the exit status."""
    if isinstance(err, KeyboardInterrupt):
        finish = "; rerun with --skip-existing to segment the rest" if command == "segment" else ""
        print(f"medrwkv {command}: interrupted; files written so far are complete, nothing half-written was left"
              f"{finish}", file=sys.stderr)
        return 130
    if isinstance(err, OSError):
        print(f"medrwkv {command}: error: {_os_error(err)}", file=sys.stderr)
        return 2
    if isinstance(err, (ValueError, RuntimeError)):
        print(f"medrwkv {command}: error: {_one_line(err)}", file=sys.stderr)
        return 2
    if os.environ.get("MEDRWKV_TRACEBACK"):      # a bug: still one line, the details on request
        raise err
    print(f"medrwkv {command}: unexpected error ({type(err).__name__}: {_one_line(err)}); this is a bug: please "
          "report it with the command line (MEDRWKV_TRACEBACK=1 shows the details)", file=sys.stderr)
    return 3


def _one_line(err) -> str:
    return " ".join(str(err).split())


#: What to do about an OSError, by errno.
_OS_HINTS = {
    errno.ENOSPC: "free some space or write elsewhere",
    errno.EDQUOT: "free some space or write elsewhere",
    errno.EFBIG: "the file system refuses a file this large; write elsewhere",
    errno.EACCES: "choose a place you can write to, or ask for permission",
    errno.EPERM: "choose a place you can write to, or ask for permission",
    errno.EROFS: "the file system is read-only; choose another place",
    errno.EISDIR: "it is a folder; give a file name",
    errno.ENOTDIR: "a part of the path is a file, not a folder; choose another path",
    errno.ENOENT: "check the path",
    errno.EEXIST: "pass --overwrite to replace it, or choose another name",
}


def _os_error(err: OSError) -> str:
    """An OSError as one line: the path, what happened, what to do."""
    what = err.strerror or _one_line(err) or type(err).__name__
    hint = _OS_HINTS.get(err.errno)
    where = f"{err.filename}: " if err.filename else ""
    if err.errno == errno.EEXIST and "--overwrite" in what:
        hint = None
    return f"{where}{what}" + (f"; {hint}" if hint and hint not in what else "")


def _terminate_as_interrupt():
    """SIGTERM (a kill, a scheduler's stop) handled as Ctrl+C: temporary files are removed and
    training keeps the best weights so far.  Returns a function that restores the old handler."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    old = signal.signal(signal.SIGTERM, lambda signum, frame: signal.default_int_handler(signum, frame))
    return lambda: signal.signal(signal.SIGTERM, old)


class _Parser(argparse.ArgumentParser):
    """Errors in one line (with where to read more), like every other failure of the command."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _number(kind, low=None, high=None, low_open=False, high_open=False):
    """An argparse type: ``kind`` (int or float), finite, within the bounds; errors name the range."""
    word = "a whole number" if kind is int else "a number"
    parts = []
    if low is not None:
        parts.append(f"{'above' if low_open else 'at least'} {low:g}")
    if high is not None:
        parts.append(f"{'below' if high_open else 'at most'} {high:g}")
    wanted = f"{word} {' and '.join(parts)}".strip()

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: give {wanted}") from None
        if kind is float and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r}: give {wanted}")
        if low is not None and (value <= low if low_open else value < low):
            raise argparse.ArgumentTypeError(f"{text!r}: give {wanted}")
        if high is not None and (value >= high if high_open else value > high):
            raise argparse.ArgumentTypeError(f"{text!r}: give {wanted}")
        return value
    parse.__name__ = kind.__name__
    return parse


POSITIVE_INT = _number(int, 1)
FRACTION = _number(float, 0, 1)
#: Smallest tile and training patch: the networks halve the image five times.
MIN_TILE = 32


def _parser():
    parser = _Parser(prog="medrwkv", description="RWKV U-Net segmentation: segment, train, evaluate.")
    sub = parser.add_subparsers(dest="command", required=True)

    models = sub.add_parser("models", help="list shipped checkpoints and architectures")
    models.set_defaults(run=_models)

    seg = sub.add_parser("segment", help="segment image files")
    _model_args(seg, "shipped name, checkpoint path, or architecture name; auto: per image, the shipped model "
                     "trained on images like it")
    seg.add_argument("inputs", nargs="+", metavar="INPUT",
                     help="image files (PNG, JPEG, TIFF, BMP, GIF), scans (NIfTI, NRRD, MetaImage, a DICOM series "
                          "folder), or folders: every image file and scan directly inside")
    seg.add_argument("--out", required=True, help="folder for the label images (created if missing)")
    seg.add_argument("--tile", type=_number(int, MIN_TILE),
                     help="largest plane side run in one piece (default: the whole plane when it fits the memory "
                          "budget, else the largest tiles that fit; MEDRWKV_TILE_MEMORY_MB sets it)")
    seg.add_argument("--probabilities", action="store_true", help="also write float32 probability TIFFs")
    seg.add_argument("--planes", choices=("acquired", "axial", "coronal", "sagittal"), default="acquired",
                     help="scans: the planes to segment, slice after slice (default: those the scanner acquired); "
                          "the labels are written in the scan's format (DICOM: .nii.gz) on its grid")
    seg.add_argument("--window", type=_window, metavar="NAME|LEVEL,WIDTH",
                     help="an intensity window instead of each slice's percentiles, for CT: soft-tissue, lung, "
                          "bone, brain, or LEVEL,WIDTH in the image's units (e.g. 40,400 HU); 'percentiles' for "
                          "none (default: the model's own, the window it was trained with, if any)")
    _inference_args(seg)
    existing = seg.add_mutually_exclusive_group()
    existing.add_argument("--overwrite", action="store_true", help="replace label files that already exist")
    existing.add_argument("--skip-existing", "--resume", action="store_true",
                          help="leave label files that already exist as they are and segment only the images "
                               "without them (to finish a run that stopped)")
    big = seg.add_argument_group("large images and Dask (zarr / OME-Zarr stores and TIFFs of 8192x8192 or more "
                                 "are segmented block by block into <stem>_labels.zarr, OME-Zarr labels)")
    big.add_argument("--block", type=_number(int, 16), help="block side for those, one zarr chunk (default 2048)")
    dask = big.add_mutually_exclusive_group()
    dask.add_argument("--workers", type=_number(int, 1), metavar="N",
                      help="spread files and blocks over N local Dask worker processes (one thread each)")
    dask.add_argument("--scheduler", metavar="ADDRESS", help="run on a running Dask cluster, e.g. tcp://host:8786")
    dask.add_argument("--scheduler-file", metavar="FILE", help="run on the Dask cluster this scheduler file names "
                                                               "(e.g. one dask-jobqueue started)")
    seg.set_defaults(run=_segment)

    tr = sub.add_parser("train", help="train or fine-tune on a dataset folder")
    _model_args(tr)
    tr.add_argument("--data", required=True, help="folder with images/ and masks/ (and optionally splits.json)")
    tr.add_argument("--split", help="training split in splits.json (default: all pairs)")
    tr.add_argument("--val-split", help="validation split (default: hold out 15%% of the training pairs)")
    tr.add_argument("--val-include", help="comma-separated stem patterns: validate (rank epochs) on those pairs "
                                          "only, e.g. 'benign_*,malignant_*'")
    tr.add_argument("--epochs", type=POSITIVE_INT)
    tr.add_argument("--max-minutes", type=_number(float, 0, low_open=True))
    tr.add_argument("--out", required=True, help="checkpoint to write (.safetensors)")
    tr.add_argument("--lr", type=_number(float, 0, low_open=True))
    tr.add_argument("--batch-size", type=POSITIVE_INT)
    tr.add_argument("--patch-size", type=_number(int, MIN_TILE))
    tr.add_argument("--samples-per-epoch", type=POSITIVE_INT)
    tr.add_argument("--seed", type=_number(int, 0, 2 ** 32 - 1))
    tr.add_argument("--input-scale", type=_number(float, 0, 4, low_open=True),
                    help="resize images by this factor before the network (0.5 = half size; default: the "
                         "model's own, 1 for a bare architecture); stored in the checkpoint for inference")
    tr.add_argument("--freeze", choices=["none", "norm_stats", "encoder"],
                    help="what stays as it is: nothing (default), BatchNorm statistics, or the encoder")
    tr.add_argument("--foreground", type=FRACTION,
                    help="fraction of training crops placed on a foreground pixel (default 1/3; 0 = uniform crops)")
    tr.add_argument("--augment-strength", type=_number(float, 0, 3),
                    help="scales the random scale, intensity and noise ranges (default 1; 0 = flips and rotations only)")
    tr.add_argument("--ema", type=_number(float, 0, 1, high_open=True), metavar="DECAY",
                    help="validate and keep a moving average of the weights, this decay per step "
                         "(e.g. 0.995: about the last 200 steps; default off)")
    tr.add_argument("--blend", type=_number(float, 0, 1, low_open=True), metavar="SHARE",
                    help="from trained weights: keep this share of the best epoch's weights, the rest the "
                         "start's (e.g. 0.75 for a few-shot fine-tuning; default 1, the epoch alone)")
    tr.add_argument("--workers", type=_number(int, 0), help="DataLoader worker processes")
    tr.add_argument("--instances", choices=["border", "distance"],
                    help="train an instance model (one label per object) from instance masks: 'distance' adds an "
                         "output for each object's distance to its edge to a binary model, 'border' one for the "
                         "border between touching objects (see docs/reference.md, Instance models)")
    tr.add_argument("--overwrite", action="store_true", help="replace --out if it exists (it may be --model itself)")
    tr.add_argument("--in-chans", type=POSITIVE_INT, default=3, help="input channels for a bare architecture (default 3)")
    tr.add_argument("--num-classes", type=POSITIVE_INT, default=1, help="classes for a bare architecture (1 = binary)")
    tr.add_argument("--class-names", help="comma-separated class names for a bare architecture, or new names for a checkpoint's classes")
    tr.add_argument("--interactive", action="store_true",
                    help="train a prompt-aware model for click to fix (nm.refine) from --model, by simulated users "
                         "clicking the objects of the masks; needs --max-minutes")
    tr.add_argument("--extra-data", action="append", metavar="FOLDER",
                    help="with --interactive: another dataset folder to train on with --data (repeatable)")
    tr.add_argument("--window", type=_number(int, MIN_TILE),
                    help="with --interactive: the square window the network sees, in pixels (default 160)")
    tr.add_argument("--intensity-window", type=_window, metavar="NAME|LEVEL,WIDTH",
                    help="train on CT slices seen through this window (soft-tissue, lung, bone, brain, or "
                         "LEVEL,WIDTH), recorded in the checkpoint: segment uses it with the model unless told "
                         "otherwise; 'percentiles' for none (default: the model's own)")
    tr.set_defaults(run=_train)

    ev = sub.add_parser("evaluate", help="Dice / IoU / HD95 on a dataset folder")
    _model_args(ev)
    ev.add_argument("--data", required=True)
    ev.add_argument("--split", help="split in splits.json (default: all pairs)")
    ev.add_argument("--tile", type=_number(int, MIN_TILE))
    ev.add_argument("--include", help="comma-separated stem patterns to score, e.g. 'benign_*,malignant_*' "
                                      "(default: every pair of the split)")
    ev.add_argument("--instances", action=argparse.BooleanOptionalAction, default=None,
                    help="also score objects against instance masks: accuracy at IoU 0.5 and 0.75, DSB2018 score, "
                         "panoptic quality (default: on for an instance model; a binary model's objects are its "
                         "connected components)")
    _inference_args(ev)
    ev.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    ev.add_argument("--record", action="store_true",
                    help="also store the scores in the checkpoint's metadata as SPLIT_dice, SPLIT_iou, SPLIT_hd95, "
                         "SPLIT_n and SPLIT_split (a description); the weights are left as they are")
    ev.set_defaults(run=_evaluate)

    cal = sub.add_parser("calibrate", help="choose a binary model's threshold and largest-object filter on "
                                           "validation images, and write them into a checkpoint")
    _model_args(cal)
    cal.add_argument("--data", required=True)
    cal.add_argument("--split", help="split in splits.json to choose on (default: all pairs); never the test split "
                                     "you will report")
    cal.add_argument("--include", help="comma-separated stem patterns to score (default: every pair of the split)")
    cal.add_argument("--tile", type=_number(int, MIN_TILE))
    cal.add_argument("--try-flips", action="store_true", help="also try test-time flips (4x the time per image)")
    cal.add_argument("--thresholds", default=",".join(str(t) for t in CALIBRATION_THRESHOLDS),
                     help="comma-separated thresholds to try (default %(default)s; 0.5 is always tried)")
    cal.add_argument("--min-gain", type=_number(float, 0), default=0.001,
                     help="a setting is chosen over a plainer one only if it gains more than this mean Dice "
                          "(default %(default)s)")
    cal.add_argument("--out", required=True, help="checkpoint to write: the model's weights, byte for byte, with the "
                                                  "chosen settings in its metadata")
    cal.add_argument("--overwrite", action="store_true", help="replace --out if it exists (it may be --model itself)")
    cal.set_defaults(run=_calibrate)

    avg = sub.add_parser("average", help="average the weights of checkpoints trained from one start (e.g. two "
                                         "seeds of one recipe) into one checkpoint")
    avg.add_argument("inputs", nargs="+", metavar="CHECKPOINT", help="shipped names or .safetensors files, at least two")
    avg.add_argument("--shares", help="comma-separated weights, one per checkpoint (default: equal)")
    avg.add_argument("--out", required=True, help="checkpoint to write (.safetensors); calibrate it afterwards")
    avg.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    avg.set_defaults(run=_average)

    app = sub.add_parser("appearance", help="record in a checkpoint what its training images look like, so that "
                                            "the app suggests it for images like them (train records this itself)")
    app.add_argument("--model", required=True, help="shipped name or .safetensors checkpoint")
    app.add_argument("--data", required=True, help="the dataset folder the model was trained on")
    app.add_argument("--split", help="the split it was trained on (default: all pairs)")
    app.add_argument("--include", help="comma-separated stem patterns it was trained on (default: every pair)")
    app.set_defaults(run=_appearance)
    return parser


def _inference_args(p):
    p.add_argument("--flips", action=argparse.BooleanOptionalAction, default=None, help=FLIPS_HELP)
    p.add_argument("--threshold", type=_number(float, 0, 1, low_open=True, high_open=True), help=THRESHOLD_HELP)
    p.add_argument("--largest-component", action=argparse.BooleanOptionalAction, default=None, help=LARGEST_HELP)


def _inference_kwargs(args) -> dict:
    return {"flips": args.flips, "threshold": args.threshold, "largest_component": args.largest_component}


def _model_args(p, model_help="shipped name, checkpoint path, or architecture name"):
    p.add_argument("--model", required=True, help=model_help)
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N or mps")


def _models(args) -> int:
    from .engine.checkpoint import read_info
    from .engine.model import list_shipped, shipped_path
    from .models import list_models
    print("shipped checkpoints:")
    for name in list_shipped():
        info = read_info(shipped_path(name))
        metrics = ", ".join(f"{k} {v:.3f}" for k, v in info.metrics.items() if isinstance(v, (int, float)))
        settings = ", ".join(describe_inference(info.inference))
        print(f"  {name:24s} {info.architecture:14s} classes: {', '.join(info.class_names[1:]) or '-'}"
              + (f"  ({metrics})" if metrics else "") + (f"  [segments with {settings}]" if settings else ""))
    if not list_shipped():
        print("  (none)")
    print("architectures:")
    for name in list_models():
        print(f"  {name}")
    return 0


def _segment(args) -> int:
    from .engine.model import load_model
    from .engine.postprocess import inference_settings
    from .engine.scaleout import DaskRun
    out = Path(args.out)
    _check_writable_folder(out)
    jobs = _segment_jobs(_segment_sources(args.inputs, out), out, args.probabilities)
    _refuse_inputs_as_outputs(jobs)
    existing = [t for _, labels, probs in jobs for t in (labels, probs) if t is not None and t.exists()]
    if existing and not (args.overwrite or args.skip_existing):
        raise FileExistsError(errno.EEXIST, f"exists ({len(existing)} output file(s) in all); pass --overwrite to "
                                            "replace them, or --skip-existing to segment only the images without "
                                            "them", str(existing[0]))
    skipped = 0
    if args.skip_existing:
        todo = [(source, [t for t in (labels, probs) if t is not None and not t.exists()]) for source, labels, probs in jobs]
        skipped = sum(1 for _, targets in todo if not targets)
        jobs = [(source, *[t if t in targets else None for t in (labels, probs)])
                for (source, labels, probs), (_, targets) in zip(jobs, todo) if targets]
    chosen = [_suggested_model(source) for source, _, _ in jobs] if args.model == AUTO else [args.model] * len(jobs)
    models = {name: load_model(name, device=args.device) for name in dict.fromkeys(chosen)}
    for model in models.values():
        inference_settings(model.info, **_inference_kwargs(args))      # a bad --threshold fails before any work
    with DaskRun(args.workers, args.scheduler, args.scheduler_file) as client:   # a dead scheduler: before any work
        return _segment_jobs_run(args, jobs, chosen, models, skipped, client)


def _segment_jobs_run(args, jobs, chosen, models, skipped, client) -> int:
    import numpy as np
    from functools import partial
    from .engine.imageio import read_image, write_labels
    from .engine.infer import segment
    from .engine.scaleout import is_large_input, segment_files, segment_to_ome_zarr
    from .engine.scans import segment_scan, write_scan
    out = Path(args.out)
    made = _make_folder(out)
    # Counted in images, moving with the tiles inside each, so one large image shows progress too.
    bar = _LazyBar("segment", "image", "{l_bar}{bar}| {n:.1f}/{total} images [{elapsed}<{remaining}]")
    done = 0
    large = [is_large_input(source) for source, _, _ in jobs]
    spread = set()          # on Dask: whole files one task each, first; the large ones block by block below
    try:
        if client is not None:
            from .engine.scans import is_scan
            spread = {i for i, (source, _, _) in enumerate(jobs) if not large[i] and not is_scan(source)}
            for name in dict.fromkeys(chosen[i] for i in spread):
                these = [jobs[i] for i in sorted(spread) if chosen[i] == name]
                done += segment_files(client, these, models[name], partial(write_labels, overwrite=args.overwrite),
                                      progress=lambda d, total, done=done: bar.update_to(done + d, len(jobs)),
                                      tile=args.tile, **_inference_kwargs(args))
        for i, ((source, labels_file, probs_file), name) in enumerate(zip(jobs, chosen)):
            if i in spread:
                continue
            if large[i]:
                try:
                    segment_to_ome_zarr(source, models[name], labels_file, name=Path(name).stem, tile=args.tile,
                                        block=args.block, client=client, overwrite=args.overwrite,
                                        progress=lambda d, total, base=done: bar.update_to(base + d / total, len(jobs)),
                                        **_inference_kwargs(args))
                except ValueError as err:
                    raise ValueError(f"{source}: {_one_line(err).removeprefix('segment: ')}") from None
                done += 1
                bar.update_to(done, len(jobs))
                continue
            scan = _read_scan_input(source, bar)
            settings = dict(model=models[name], tile=args.tile, return_probabilities=True,
                            progress=lambda d, total, i=i: bar.update_to(i + d / total, len(jobs)),
                            window=args.window, **_inference_kwargs(args))
            try:
                labels, probs = segment(read_image(source), **settings) if scan is None else \
                    segment_scan(scan, args.planes, **settings)
            except ValueError as err:          # the image's fault (its shape, its type): name the file
                raise ValueError(f"{source}: {_one_line(err).removeprefix('segment: ')}") from None
            # Exclusive unless --overwrite: a file another run made meanwhile is never replaced.
            # A scan's labels go on its own grid (spacing, origin, direction), in its format.
            for target, array in ((labels_file, labels), (probs_file, probs.astype(np.float32))):
                if target is not None and scan is not None:
                    write_scan(target, array, scan.geometry, overwrite=args.overwrite)
                elif target is not None:
                    write_labels(target, array, overwrite=args.overwrite)
            done += 1
            bar.update_to(i + 1, len(jobs))
    except (Exception, KeyboardInterrupt) as err:
        bar.close()
        if made is not None and not any(out.iterdir()):
            _remove_folders(made)
        if done and isinstance(err, (OSError, ValueError, RuntimeError)):
            # Say how to go on; the files written so far are complete.
            text = _os_error(err) if isinstance(err, OSError) else _one_line(err)
            raise RuntimeError(f"{text} ({done} of {len(jobs)} image(s) were segmented into {out}; rerun with "
                               "--skip-existing to segment the rest)") from None
        raise
    bar.close()
    used = f" ({', '.join(f'{name}: {n}' for name, n in Counter(chosen).items())})" if args.model == AUTO else ""
    skip = f"; skipped {skipped} whose label files existed" if skipped else ""
    print(f"wrote {len(jobs)} label image(s) to {out}{used}{skip}")
    return 0


def _window(text: str):
    """--window: a preset name (soft-tissue for "soft tissue"), LEVEL,WIDTH, or percentiles."""
    from .engine.preprocess import CT_WINDOWS, PERCENTILES, window_range
    if text == PERCENTILES:
        return text
    name = text.replace("-", " ")
    window = name if name in CT_WINDOWS else tuple(text.split(","))
    try:
        window_range(window)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give {', '.join(n.replace(' ', '-') for n in CT_WINDOWS)} "
                                         "or LEVEL,WIDTH (e.g. 40,400)") from None
    return window if isinstance(window, str) else tuple(float(v) for v in window)


def _read_scan_input(source: Path, bar):
    """The scan at ``source`` (saying which DICOM series was read, when there was a choice), or None."""
    from .engine.scans import is_scan, read_scan
    if not is_scan(source):
        return None
    scan = read_scan(source)
    if scan.note:
        bar.write(scan.note)
    return scan


def _refuse_inputs_as_outputs(jobs) -> None:
    """An input is never written over, not even with --overwrite: an image named like the labels
    of another (``a.png`` and ``a_labels.png``, segmented into their own folder) is refused."""
    inputs = {_file_identity(source): source for source, _, _ in jobs}
    for source, *targets in jobs:
        for target in targets:
            if target is not None and target.exists() and _file_identity(target) in inputs:
                raise ValueError(f"{target} is one of the input images, and the labels of {source} would be written "
                                 f"over it; inputs are never replaced, even with --overwrite: choose another --out")


def _file_identity(path: Path):
    try:
        st = os.stat(path)
    except OSError:
        return os.path.abspath(path)
    return st.st_dev, st.st_ino


def _check_writable_folder(folder: Path) -> None:
    """An error naming --out when it, or the nearest folder above it that exists, is a file or
    cannot be written (found before any work, not after the first image)."""
    existing = next(p for p in (folder, *folder.parents, Path(".")) if p.exists())
    if not existing.is_dir():
        what = "is a file" if existing == folder else f"is a file, so the folder {folder} cannot be made under it"
        raise ValueError(f"--out {folder}: {existing} {what}; give a folder for the label images")
    try:
        import tempfile
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        raise ValueError(f"--out {folder}: cannot write in {existing} ({err.strerror}); choose a folder you can "
                         "write to") from None


def _make_folder(folder: Path):
    """Creates ``folder`` and any missing parents; returns the ones it made (outermost first), or None."""
    missing = [p for p in (folder, *folder.parents) if not p.exists()][::-1]
    folder.mkdir(parents=True, exist_ok=True)
    return missing or None


def _remove_folders(made) -> None:
    """Removes the folders this run made (innermost first), where they are still empty."""
    for folder in reversed(made):
        try:
            folder.rmdir()
        except OSError:
            return


def _suggested_model(path: Path) -> str:
    """The shipped model trained on images like the one in ``path`` (a stack: its middle slice)."""
    from .engine.appearance import suggest_model
    from .engine.imageio import read_image
    from .engine.preprocess import plane_layout
    from .engine.scaleout import is_large_input
    if is_large_input(path):
        raise ValueError(f"--model auto: {path} is segmented block by block and never read whole, so no model is "
                         "suggested for it; name a model with --model (see medrwkv models)")
    image = read_image(path)
    stack_axes, _ = plane_layout(image.shape)        # segment would take the file the same way
    suggestion = suggest_model(image[len(image) // 2] if stack_axes else image)
    if suggestion is None:
        raise ValueError(f"--model auto: none of the shipped models was trained on images like {path}; "
                         "name a model with --model (see medrwkv models)")
    return suggestion.source


def _segment_sources(inputs, out: Path) -> list:
    """The image files to segment: each input file, and the image files inside each input folder,
    less this command's own outputs when that folder is the output folder (a second run into the
    images' folder must not segment the first run's labels)."""
    from .engine.blocks import is_block_source
    from .engine.imageio import DataError, list_image_files
    from .engine.scans import scan_stem
    sources = []
    for given in map(Path, inputs):
        if given.suffix.lower() == ".zarr" or (given.is_dir() and is_block_source(given)):
            sources.append(given)             # a zarr store, read block by block
            continue
        files = list_image_files([given])
        if given.is_dir() and given.resolve() == out.resolve():
            files = [f for f in files if not scan_stem(f).endswith(("_labels", "_probabilities"))]
            if not files:
                raise DataError(f"folder {given} holds only label and probability files of earlier runs; "
                                "name the folder of the images")
        sources.extend(files)
    return sources


def _segment_jobs(sources, out: Path, probabilities: bool) -> list:
    """(image, labels file, probabilities file or None) per source.  Two sources with one stem
    would write the same files, the second over the first: refused, naming both."""
    from .engine.scans import is_scan, labels_name, scan_stem
    seen = {}
    for source in sources:
        stem = scan_stem(source)
        if stem in seen:
            raise ValueError(f"{seen[stem]} and {source} share the name {stem!r}, so their label "
                             f"files in {out} would overwrite each other; segment them into different --out folders")
        seen[stem] = source
    from .engine.scaleout import is_large_input, labels_store_name
    large = [source for source in sources if is_large_input(source)]
    if large and probabilities:
        raise ValueError(f"--probabilities: {large[0]} is segmented block by block into OME-Zarr labels, which "
                         "hold no probabilities; leave out --probabilities for zarr stores and large TIFFs")
    return [(source, out / labels_store_name(source), None) if source in large else
            (source, out / labels_name(source), out / labels_name(source, "probabilities") if probabilities else None)
            if is_scan(source) else
            (source, out / f"{source.stem}_labels{'.tif' if _is_stack(source) else '.png'}",
             out / f"{source.stem}_probabilities.tif" if probabilities else None) for source in sources]


def _is_stack(path) -> bool:
    return Path(path).suffix.lower() in (".tif", ".tiff")


def _train(args) -> int:
    if args.interactive:
        return _train_interactive(args)
    for name in ("extra_data", "window"):
        if getattr(args, name) is not None:
            raise ValueError(f"--{name.replace('_', '-')} goes with --interactive")
    from .engine.infer import Cancelled
    from .engine.model import load_model
    from .engine.train import TrainConfig, _check_out, train
    _check_out(args.out)            # a folder, under a file, unwritable: said as such, before "exists"
    if Path(args.out).exists() and not args.overwrite:
        # Refused before the first step, not after hours of training: the file may be a model that took as long.
        raise FileExistsError(errno.EEXIST, "exists; pass --overwrite to replace it when training ends, or choose "
                                            "another --out", args.out)
    cfg = TrainConfig()
    for name in ("lr", "batch_size", "patch_size", "samples_per_epoch", "seed", "input_scale", "freeze",
                 "foreground", "augment_strength", "ema", "blend", "instances"):
        if getattr(args, name) is not None:
            setattr(cfg, name, getattr(args, name))
    cfg.window = args.intensity_window
    if args.workers is not None:
        cfg.num_workers = args.workers
    class_names = args.class_names.split(",") if args.class_names else None
    model = load_model(args.model, device=args.device, in_chans=args.in_chans, num_classes=args.num_classes,
                       class_names=class_names)
    bar = _LazyBar("train", "step")
    score = "DSB score" if args.instances or model.info.instances else "Dice"     # what ranks the epochs

    def progress(p):
        if p.epoch == 0:
            bar.write(f"starting weights: val {score} {p.val_dice:.4f}")
        elif p.val_dice is None:
            bar.update_to(p.step, p.steps_per_epoch, epoch=p.epoch, loss=f"{p.loss:.4f}")
        else:
            bar.write(f"epoch {p.epoch}: loss {p.loss:.4f}, val {score} {p.val_dice:.4f}, {p.elapsed / 60:.1f} min")

    command = _command_line(args)
    rank = int(os.environ.get("RANK", "0"))        # under torchrun: rank 0 reports, the others train quietly
    with _StopGently(bar) as stop:
        try:
            result = train(model, args.data, out=args.out, epochs=args.epochs, max_minutes=args.max_minutes,
                           device=args.device, progress=progress if rank == 0 else None, cancel=stop.requested,
                           split=args.split,
                           val_split=args.val_split, val_include=_patterns(args.val_include), config=cfg,
                           command=command, overwrite=args.overwrite)
        except Cancelled:
            bar.close()
            print("medrwkv train: interrupted before the first training step; nothing was written", file=sys.stderr)
            return 130
    bar.close()
    if rank != 0:
        return 130 if result.cancelled else 0
    best = f"{result.best_val_dice:.4f}" if result.best_val_dice is not None else "n/a"
    if result.cancelled:
        print(f"medrwkv train: interrupted after {result.minutes:.1f} min; saved the best weights so far (epoch "
              f"{result.best_epoch}, val {score} {best}) to {result.path}", file=sys.stderr)
    elif result.best_epoch == 0:
        print(f"no epoch beat the starting weights (val {score} {best}) in {result.minutes:.1f} min; "
              f"wrote them, unchanged, to {result.path}")
    else:
        start = f", starting weights {result.start_val_dice:.4f}" if result.start_val_dice is not None else ""
        if result.blend < 1:
            blend = f" blended with the starting weights ({result.blend:.0%} the epoch's)"
        elif result.blend_val_dice is not None:
            blend = f" alone (its blend with the starting weights: val {score} {result.blend_val_dice:.4f})"
        else:
            blend = ""
        print(f"best epoch {result.best_epoch}{blend} (val {score} {best}{start}) after {result.minutes:.1f} min; "
              f"wrote {result.path}")
    if result.moved:
        print(f"medrwkv train: error: {_one_line(result.moved)}; the trained weights were saved to {result.path} "
              "instead", file=sys.stderr)
        return 1
    return 130 if result.cancelled else 0


#: What `medrwkv train --interactive` does not take: its examples are objects cut as refine cuts them.
_NOT_INTERACTIVE = ("epochs", "patch_size", "samples_per_epoch", "input_scale", "freeze", "foreground",
                    "augment_strength", "blend", "workers", "val_include", "instances", "intensity_window")


def _train_interactive(args) -> int:
    from .engine.interactive_train import InteractiveConfig, train_interactive
    from .engine.train import _check_out
    given = [f"--{name.replace('_', '-')}" for name in _NOT_INTERACTIVE if getattr(args, name) is not None]
    if given:
        raise ValueError(f"{', '.join(given)} do(es) not apply to --interactive training; leave them out")
    if args.max_minutes is None:
        raise ValueError("--interactive training runs for a time: give --max-minutes")
    _check_out(args.out)
    if Path(args.out).exists() and not args.overwrite:
        raise FileExistsError(errno.EEXIST, "exists; pass --overwrite to replace it, or choose another --out",
                              args.out)
    cfg = InteractiveConfig()
    for name, field in (("lr", "lr"), ("batch_size", "batch_size"), ("seed", "seed"), ("ema", "ema"),
                        ("window", "input_size")):
        if getattr(args, name) is not None:
            setattr(cfg, field, getattr(args, name))
    folders = [args.data] + list(args.extra_data or [])
    bar = _LazyBar("train", "step")
    with _StopGently(bar) as stop:
        out, score = train_interactive(args.model, folders, args.out, args.max_minutes, split=args.split,
                                       val_split=args.val_split, config=cfg, device=args.device,
                                       progress=bar.write, cancel=stop.requested, command=_command_line(args),
                                       overwrite=args.overwrite)
    bar.close()
    how = "interrupted; saved the best weights so far" if stop.requested() else "wrote"
    print(f"{how} {out} (mean IoU over the first {cfg.val_clicks} clicks of the validation objects: {score:.4f})")
    return 130 if stop.requested() else 0


class _StopGently:
    """Within the block, the first Ctrl+C (or SIGTERM) asks training to stop after its current step,
    validate, and save the best weights so far; a second one stops at once, saving nothing."""

    def __init__(self, bar):
        self.bar, self.count, self.old = bar, 0, {}

    def requested(self) -> bool:
        return self.count > 0

    def _handle(self, signum, frame):
        self.count += 1
        if self.count > 1:
            raise KeyboardInterrupt
        print("\nmedrwkv train: stopping after this step; the best weights so far will be validated and saved "
              "(Ctrl+C again to stop at once, saving nothing)", file=sys.stderr, flush=True)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self.old.items():
            signal.signal(sig, handler)
        return False


def _evaluate(args) -> int:
    from .engine.evaluate import evaluate
    bar = _LazyBar("evaluate", "image")

    def progress(done, total):
        bar.update_to(done, total)

    include = _patterns(args.include)
    record_into = _checkpoint_file(args.model) if args.record else None     # fail before the long part
    scores = evaluate(args.model, args.data, split=args.split, device=args.device, tile=args.tile,
                      progress=progress, include=include, instances=args.instances, **_inference_kwargs(args))
    bar.close()
    if record_into is not None:
        _record(record_into, scores, args.data, args.split, include)
    print(f"n={scores['n']}  Dice {scores['dice']:.4f}  IoU {scores['iou']:.4f}  HD95 {scores['hd95']:.2f} px"
          + (f"  (HD95 undefined for {scores['hd95_undefined']})" if scores["hd95_undefined"] else ""))
    if "dsb" in scores:
        print(f"objects: accuracy@0.5 {scores['accuracy50']:.4f}  accuracy@0.75 {scores['accuracy75']:.4f}  "
              f"DSB score {scores['dsb']:.4f}  PQ {scores['pq']:.4f}  (means over images; pooled: accuracy@0.5 "
              f"{scores['accuracy50_pooled']:.4f}, accuracy@0.75 {scores['accuracy75_pooled']:.4f}, "
              f"PQ {scores['pq_pooled']:.4f})")
    if args.json:
        print(json.dumps(_json_safe(scores), allow_nan=False))
    return 0


def _json_safe(value):
    """``value`` with every NaN or infinity (an undefined score) as null, at any depth: JSON has no NaN."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if hasattr(value, "item") and callable(value.item):        # numpy scalars
        return _json_safe(value.item())
    return value


def _checkpoint_file(model: str, why: str = "--record stores the scores in a checkpoint file") -> Path:
    from .engine.model import list_shipped, shipped_path
    if model in list_shipped():
        return shipped_path(model)
    path = Path(model).expanduser()
    if not path.is_file():
        raise ValueError(f"{why}, and {model!r} is none; give a .safetensors path or a shipped model's name")
    return path


#: What ``evaluate --record`` stores per split, as PREFIX_key.
RECORDED_KEYS = ("dice", "iou", "hd95", "n", "split")
#: ... and, when objects were scored (--instances), these too.
INSTANCE_KEYS = ("accuracy50", "accuracy75", "dsb", "pq", "accuracy50_pooled")


def _patterns(text):
    """Comma-separated stem patterns as a list, or None."""
    return [p.strip() for p in text.split(",") if p.strip()] if text else None


def _described_data(data: str, split, n: int, include, details=()) -> str:
    """E.g. "busi test (64 images; only benign_*, malignant_*; test-time flips)"."""
    parts = [f"only {', '.join(include)}"] if include else []
    return f"{Path(data).resolve().name} {split or 'all'} ({'; '.join([f'{n} images', *parts, *details])})"


def _record(path: Path, scores: dict, data: str, split, include) -> None:
    from .engine.checkpoint import record_metrics
    prefix = split or "all"
    described = _described_data(data, split, scores["n"], include, describe_inference(scores["inference"]))
    values = {key: (None if isinstance(scores[key], float) and math.isnan(scores[key]) else scores[key])
              for key in RECORDED_KEYS[:-1] + INSTANCE_KEYS if key in scores}
    record_metrics(path, {f"{prefix}_{key}": value for key, value in {**values, "split": described}.items()})
    print(f"recorded as {prefix}_* in {path}")


def _command_line(args) -> str:
    """How this run was started (the arguments ``main`` was given), for a checkpoint's provenance."""
    return "medrwkv " + " ".join(shlex.quote(str(a)) for a in args.argv)


def describe_inference(settings: dict) -> list:
    """The settings that differ from the defaults, in words (empty for the defaults)."""
    from .engine.checkpoint import INFERENCE_DEFAULTS
    parts = []
    if settings["flips"]:
        parts.append("test-time flips")
    if settings["threshold"] != INFERENCE_DEFAULTS["threshold"]:
        parts.append(f"threshold {settings['threshold']:g}")
    if settings["largest_component"]:
        parts.append("largest object only")
    return parts


def _new_checkpoint_path(out: str, overwrite: bool, note: str = "") -> Path:
    """--out as a path, refused before any work if it exists (without --overwrite) or is no .safetensors name."""
    from .engine.imageio import check_target
    path = Path(out).expanduser()
    if path.suffix != ".safetensors":
        raise ValueError(f"--out {path}: give a file name ending in .safetensors")
    check_target(path)                  # a folder, under a file, or in a missing folder: before any work
    if path.exists() and not overwrite:
        raise FileExistsError(errno.EEXIST, f"exists; pass --overwrite to replace it{note}", str(path))
    return path


def _calibrate(args) -> int:
    from .engine.calibrate import calibrate
    from .engine.checkpoint import update_info
    from .engine.model import load_model
    source = _checkpoint_file(args.model, "calibrate writes the chosen settings into a copy of a checkpoint file")
    out = _new_checkpoint_path(args.out, args.overwrite, " (it may be --model itself)")
    try:
        thresholds = [float(t) for t in args.thresholds.split(",") if t.strip()]
    except ValueError:
        raise ValueError(f"--thresholds {args.thresholds!r}: give numbers between 0 and 1, e.g. 0.3,0.4,0.5") from None
    include = _patterns(args.include)
    model = load_model(source, device=args.device)
    bar = _LazyBar("calibrate", "image")
    result = calibrate(model, args.data, split=args.split, include=include, try_flips=args.try_flips,
                       thresholds=thresholds, tile=args.tile, progress=lambda d, t: bar.update_to(d, t),
                       min_gain=args.min_gain)
    bar.close()
    for row in result["grid"]:
        words = ", ".join(describe_inference(row)) or "defaults"
        print(f"  Dice {row['dice']:.4f}  {words}")
    where = _described_data(args.data, args.split, result["n"], include)
    stale = []

    def calibrated(info):      # applied to the header as it is when writing, not as it was at the start
        stale.extend(_drop_recorded_scores(info.metrics))
        info.inference = dict(result["inference"])
        info.metrics.update(calibrated_on=where, calibrated_dice=result["dice"],
                            uncalibrated_dice=result["baseline_dice"])
        info.training["calibration"] = _command_line(args)

    info = update_info(source, calibrated, out, overwrite=args.overwrite)
    chosen = ", ".join(describe_inference(info.inference)) or "the defaults (no flips, threshold 0.5, every object)"
    print(f"chose {chosen}: Dice {result['dice']:.4f} against {result['baseline_dice']:.4f} with the defaults, "
          f"on {where}; wrote {out}")
    if stale:
        print(f"dropped scores recorded with the old settings ({', '.join(stale)}); run evaluate --record again")
    return 0


def _average(args) -> int:
    from .engine.average import average_models
    from .engine.checkpoint import save_checkpoint
    out = _new_checkpoint_path(args.out, args.overwrite)
    try:
        shares = [float(s) for s in args.shares.split(",")] if args.shares else None
    except ValueError:
        raise ValueError(f"--shares {args.shares!r}: give one number per checkpoint, e.g. 0.5,0.5") from None
    model = average_models(args.inputs, shares, command=_command_line(args))
    save_checkpoint(model.net, out, model.info, overwrite=args.overwrite)
    weights = ", ".join(f"{Path(a['source']).stem} {a['share']:.0%}" for a in model.info.training["averaged"])
    print(f"wrote {out}: the weights of {weights}, with default inference settings (run calibrate on validation "
          "images to choose them)")
    return 0


def _appearance(args) -> int:
    from .engine.appearance import pairs_profile
    from .engine.checkpoint import read_info, update_info
    from .engine.datasets import find_pairs, pairs_matching
    path = _checkpoint_file(args.model, "appearance stores the profile in a checkpoint file")
    info = read_info(path)            # a damaged file fails before the images are read
    include = _patterns(args.include)
    pairs = find_pairs(args.data, args.split)
    if include:
        pairs = pairs_matching(pairs, include, f"{args.data} {args.split or ''}".strip())
    profile = pairs_profile(pairs, info.num_classes)
    n = len(profile["samples"])
    measured = (f"{n} of them measured, evenly spaced",) if n < len(pairs) else ()
    measured_on = _described_data(args.data, args.split, len(pairs), include, measured)
    recorded = {**profile, "measured_on": measured_on, "command": _command_line(args)}
    update_info(path, lambda current: current.training.update(appearance=recorded))
    print(f"recorded the appearance of {measured_on} in {path}")
    return 0


def _drop_recorded_scores(metrics: dict) -> list:
    """Removes the scores ``evaluate --record`` stored (they were measured with other settings)."""
    prefixes = [key[:-len("_split")] for key in metrics if key.endswith("_split")]
    for prefix in prefixes:
        for key in RECORDED_KEYS:
            metrics.pop(f"{prefix}_{key}", None)
    return [f"{p}_*" for p in prefixes]


class _LazyBar:
    """A tqdm bar that appears with the first progress report, so that errors in the
    input come out as one clean line."""

    shown = []          # bars not closed yet: closed before an error is printed, so that it has its own line

    def __init__(self, desc: str, unit: str, bar_format: str = None):
        self.desc, self.unit, self.bar_format, self.bar = desc, unit, bar_format, None

    @classmethod
    def close_all(cls):
        for bar in list(cls.shown):
            bar.close()

    def update_to(self, done: float, total: int, **postfix):
        from tqdm import tqdm
        if self.bar is None:
            self.bar = tqdm(desc=self.desc, unit=self.unit, total=total, bar_format=self.bar_format)
            _LazyBar.shown.append(self)
        if self.bar.total != total or done < self.bar.n:
            self.bar.reset(total=total)
        self.bar.update(done - self.bar.n)
        if postfix:
            self.bar.set_postfix(**postfix, refresh=False)

    def write(self, text: str):
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text)

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self in _LazyBar.shown:
            _LazyBar.shown.remove(self)


if __name__ == "__main__":
    sys.exit(main())
