"""Processes: ``torchrun``'s group, joined once (NCCL with CUDA, gloo on CPUs), and what the jobs
that run in several processes (training, embedding a file) need of it."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


# The exit status of a process that stops because another one did (``PeerStopped``): the
# launcher (``ctxvec ... --nproc N``) then names the process that stopped first for a reason of
# its own, whichever of them the group saw end first.
PEER_STOPPED_EXIT = 3


class PeerStopped(Exception):
    """Another process of the group stopped (its own error says why): this one cannot go on."""


@contextlib.contextmanager
def _together(world: int):
    """A collective call; a peer that died turns gloo's or NCCL's error into ``PeerStopped``."""
    try:
        yield
    except RuntimeError as err:  # (torch.distributed's DistError is one)
        raise PeerStopped(f"another of the {world} processes stopped (its message is above), "
                          "so this one stops too.") from err


@dataclass
class Dist:
    """This process's place among ``world`` processes (one, without ``torchrun``)."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            with _together(self.world):
                dist.barrier()

    def agree(self, flag: bool) -> bool:
        """Process 0's ``flag``, for every process: one decision, taken the same way everywhere."""
        if self.world == 1:
            return flag
        value = torch.tensor([int(flag)], device=self.device)
        with _together(self.world):
            dist.broadcast(value, src=0)
        return bool(value.item())

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        """The sum over processes (NCCL reduces on the GPU: the value travels there and back)."""
        if self.world > 1:
            on_device = value.to(self.device, copy=True)
            with _together(self.world):
                dist.all_reduce(on_device)
            value = on_device.to(value.device)
        return value


def setup_distributed() -> Dist:
    """Join the ``torchrun`` group if there is one: NCCL with CUDA, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    cuda = torch.cuda.is_available()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), device)
