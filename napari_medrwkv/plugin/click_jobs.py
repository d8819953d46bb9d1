"""Click to fix, the work behind the widget: the requests it sends to the worker thread (refine
one object, or carry a committed one to the neighbouring slices), the worker that runs them, and
how an object is painted into a Labels layer's data.  The widget (``click_to_fix.py``) decides
what to ask and shows the answers; nothing here touches a layer or a Qt widget.
"""
import time
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import numpy as np
from napari.qt.threading import thread_worker


def paint_object(before: np.ndarray, mask: np.ndarray, object_id: int, overwrite: bool = False,
                 replace: bool = False) -> np.ndarray:
    """``before`` with ``mask`` painted as ``object_id``: only over background (and the object's own
    pixels) unless ``overwrite``; with ``replace`` the object's pixels outside ``mask`` become
    background (the object is redrawn, not added to)."""
    after = np.array(before, copy=True)
    mask = np.asarray(mask, dtype=bool)
    own = before == object_id
    if replace:
        after[own & ~mask] = 0
    after[mask if overwrite else mask & ((before == 0) | own)] = object_id
    return after


def prompt_aware(source: str) -> bool:
    """Whether a shipped name or a checkpoint file takes clicks (False for anything unreadable)."""
    from ..engine.model import read_model_info
    try:
        info = read_model_info(source)
    except (ValueError, OSError):
        return False
    return info is not None and info.prompt_channels > 0


@dataclass
class Job:
    """One run on the worker thread: refine the current object, or carry a committed one."""
    number: int                       # the request counter when made (refine: stale unless the newest)
    kind: str                         # "refine" or "carry"
    source: str
    device: str
    key: tuple = ()                   # the prompt state it answers (refine)
    image: Optional[np.ndarray] = None
    points: Tuple = ()
    box: Optional[Tuple] = None
    mask: Optional[np.ndarray] = None
    commit: Optional[dict] = None     # carry: what to commit once the neighbours are done
    seconds: float = 0.0              # how long refine took (set on the worker thread)


def make_worker(job: Job, models: dict):
    @thread_worker
    def work():
        # Outcomes come back as values: an exception leaving a worker would surface as a traceback
        # in the event loop, where users should see a notification.
        from ..engine import interactive
        from ..engine.model import load_model
        try:
            key = (job.source, job.device)
            if key not in models:
                models[key] = load_model(job.source, device=job.device)
            model = models[key]
            if job.kind == "refine":
                start = time.perf_counter()
                mask = interactive.refine(job.image, points=list(job.points), box=job.box, mask=job.mask,
                                          model=model, rgb=job.image.ndim == 3)
                job.seconds = time.perf_counter() - start
                return "done", mask
            return "done", carry(job, model, interactive.refine)
        except Exception as err:  # noqa: BLE001 -- reported to the user, never swallowed
            return "error", str(err) if isinstance(err, ValueError) else f"{type(err).__name__}: {err}"

    return work()


def carry(job: Job, model, refine) -> Dict[int, np.ndarray]:
    """The committed mask refined slice by slice away from its slice, both ways, each slice starting
    from its neighbour's answer, until the object vanishes or ``limit`` slices."""
    plan = job.commit
    stack, start, limit = plan["stack"], plan["index"], plan["limit"]
    depth = stack.data.shape[0]
    carried = {}
    for step in (-1, 1):
        previous = plan["mask"]
        for k in range(1, limit + 1):
            index = start + step * k
            if not 0 <= index < depth:
                break
            plane = np.asarray(stack.data[index])
            mask = refine(plane, mask=previous, model=model, rgb=plane.ndim == 3)
            if not mask.any():
                break
            carried[index] = mask
            previous = mask
    return carried


def next_id(data: np.ndarray, name: str) -> int:
    """The id a new object gets in labels ``data`` (of the layer ``name``): one above the highest."""
    top = int(np.max(data)) if data.size else 0
    new = top + 1
    if np.issubdtype(data.dtype, np.integer) and new > np.iinfo(data.dtype).max:
        raise ValueError(f"{name} holds {data.dtype} labels and has no id left above {top}.")
    return new
