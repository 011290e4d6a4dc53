"""Several processes under `torchrun` (or `accelerate launch`): which one this is, and the
few collective operations training needs. With one process every call is a no-op."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from rmt.utils import resolve_device


@dataclass(frozen=True)
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_environment(cls) -> "Distributed":
        """The launcher's RANK / WORLD_SIZE / LOCAL_RANK; joins the process group once."""
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size == 1:
            return cls()
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
        return cls(rank=dist.get_rank(), world_size=world_size, local_rank=int(os.environ.get("LOCAL_RANK", "0")))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, requested: str) -> torch.device:
        device = resolve_device(requested)
        if device.type == "cuda" and self.world_size > 1:
            return torch.device("cuda", self.local_rank)
        return device

    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        if self.world_size == 1:
            return model
        # Truncated BPTT can leave the memory embeddings without a gradient in a step.
        return nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True
        )

    def sum(self, value: float, device: torch.device) -> float:
        if self.world_size == 1:
            return value
        total = torch.tensor(float(value), dtype=torch.float64, device=device)
        dist.all_reduce(total)
        return float(total)

    def gather(self, value) -> list:
        if self.world_size == 1:
            return [value]
        gathered = [None] * self.world_size
        dist.all_gather_object(gathered, value)
        return gathered

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()
