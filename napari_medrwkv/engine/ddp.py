"""Training on several processes with torchrun: DistributedDataParallel, as PyTorch does it.

``torchrun --standalone --nproc_per_node N -m napari_medrwkv train ...`` starts N copies of
``medrwkv train``; torchrun sets RANK, WORLD_SIZE and LOCAL_RANK, and :func:`setup` joins them
in a process group (gloo on the CPU, NCCL on CUDA, each process on GPU LOCAL_RANK).  Each rank
trains on its share of every epoch's samples (a DistributedSampler, reshuffled per epoch by
``set_epoch``); DDP averages the gradients, so the weights stay equal on every rank.  Decisions
that depend on a clock (the learning-rate schedule under a time budget, stopping, validating)
are taken by rank 0 and sent to the others, so that all ranks take the same steps.  Rank 0
validates and saves; the others wait at a barrier.
"""
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

#: Set to 1 to check after every step that all ranks hold the same weights (tests, debugging).
CHECK_ENV = "MEDRWKV_DDP_CHECK"


@dataclass
class Distributed:
    rank: int
    world: int
    device: torch.device
    made_group: bool

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sampler(self, dataset, seed: int):
        return torch.utils.data.distributed.DistributedSampler(dataset, num_replicas=self.world, rank=self.rank,
                                                               shuffle=True, seed=seed, drop_last=True)

    def wrap(self, net: torch.nn.Module) -> torch.nn.Module:
        ids = [self.device.index] if self.device.type == "cuda" else None
        # Frozen parts (freeze="encoder") get no gradients: DDP must not wait for them.
        return torch.nn.parallel.DistributedDataParallel(net, device_ids=ids, find_unused_parameters=False)

    def from_main(self, *values: float):
        """Rank 0's ``values`` on every rank."""
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self._comm_device)
        dist.broadcast(t, 0)
        return tuple(t.tolist())

    def barrier(self) -> None:
        dist.barrier()

    def check_same(self, net: torch.nn.Module, step: int) -> None:
        """With MEDRWKV_DDP_CHECK=1: a RuntimeError unless every rank holds the same weights."""
        if os.environ.get(CHECK_ENV) != "1":
            return
        with torch.no_grad():
            mine = torch.stack([sum(p.double().sum() for p in net.parameters()),
                                sum(p.double().square().sum() for p in net.parameters())]).to(self._comm_device)
        gathered = [torch.zeros_like(mine) for _ in range(self.world)]
        dist.all_gather(gathered, mine)
        if any(not torch.equal(g, gathered[0]) for g in gathered):
            raise RuntimeError(f"ranks hold different weights after step {step}: "
                               f"{[g.tolist() for g in gathered]}")
        if self.main:
            print(f"ddp check: step {step}: {self.world} ranks hold the same weights", flush=True)

    def close(self) -> None:
        if self.made_group and dist.is_initialized():
            dist.destroy_process_group()

    @property
    def _comm_device(self) -> torch.device:
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")


def setup(device="auto") -> Optional[Distributed]:
    """The process group torchrun asked for (None when not run by torchrun with 2 or more
    processes), joined here unless the caller joined it already."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world < 2:
        return None
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    name = str(device or "auto")
    on_cuda = torch.cuda.is_available() and (name == "auto" or name.startswith("cuda"))
    chosen = torch.device(f"cuda:{local}") if on_cuda else torch.device("cpu")
    if name not in ("auto", "cpu") and not name.startswith("cuda"):
        raise ValueError(f"device={device!r}: training on several processes runs on the CPU or CUDA GPUs")
    made = False
    if not dist.is_initialized():
        if on_cuda:
            torch.cuda.set_device(chosen)
        dist.init_process_group("nccl" if on_cuda else "gloo")
        made = True
    return Distributed(rank, world, chosen, made)
