"""Calibration across processes and machines: the few torch.distributed exchanges the calibration driver needs.

Launch ``slimdiff calibrate`` with ``torchrun`` (one process per GPU, or several CPU processes); the driver
(:func:`slimdiff.calibrate.calibrate`) splits the prompts into fixed chunks and deals them round-robin over the
ranks. Rank 0 receives every chunk's float64 sums and adds them in chunk order — never trusting an all-reduce's
order — so the statistics are bit-identical to a single-process run, which adds the same chunks in the same
order. This module only moves bytes: JSON headers and tensors, point to point or broadcast from rank 0, over
gloo on CPU and NCCL on GPUs. It does not unpickle: torch.distributed's object collectives would.
"""

from __future__ import annotations

import hashlib
import json
import os
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Iterator

import torch
import torch.distributed as dist

from .errors import SlimDiffError

# A rank waits for the others while they sample a whole chunk (minutes on SDXL): far above the default timeouts.
CHUNK_TIMEOUT = timedelta(hours=2)


def launched_by_torchrun() -> bool:
    """True in a process started by torchrun (or any launcher that sets the env:// variables)."""
    return all(name in os.environ for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def rank_device(device: str) -> str:
    """The device of this rank: under torchrun ``cuda`` means this node's ``cuda:LOCAL_RANK``."""
    if device == "cuda" and launched_by_torchrun():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return device


@dataclass(frozen=True)
class Group:
    """The calibrating processes: this process's ``rank`` among ``size``; tensors travel on ``device``.

    ``Group()`` is a single process: every exchange is the identity and nothing is sent.
    """

    rank: int = 0
    size: int = 1
    device: str = "cpu"

    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    def check_same(self, what: str, text: str) -> None:
        """Fail on every rank, before any sampling, unless all ranks hold the same ``text``."""
        if self.size == 1:
            return
        mine = torch.frombuffer(bytearray(hashlib.sha256(text.encode()).digest()), dtype=torch.uint8).to(self.device)
        everyone = [torch.empty_like(mine) for _ in range(self.size)]
        dist.all_gather(everyone, mine)
        differ = [r for r, digest in enumerate(everyone) if not torch.equal(digest, everyone[0])]
        if differ:
            raise SlimDiffError(f"ranks {differ} disagree with rank 0 on the {what}: every rank needs the same "
                                "model, prompts and calibration arguments")

    def broadcast_json(self, body: dict | None) -> dict:
        """Rank 0's ``body`` on every rank (other ranks pass None)."""
        if self.size == 1:
            assert body is not None
            return body
        size = torch.zeros(1, dtype=torch.int64, device=self.device)
        data = json.dumps(body).encode() if self.is_leader else b""
        size[0] = len(data)
        dist.broadcast(size, 0)
        buffer = (_as_bytes_tensor(data) if self.is_leader
                  else torch.empty(int(size[0]), dtype=torch.uint8)).to(self.device)
        dist.broadcast(buffer, 0)
        return json.loads(bytes(buffer.cpu().numpy()))

    def broadcast_tensors(self, tensors: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
        """Rank 0's tensors (CPU copies) on every rank."""
        if self.size == 1:
            assert tensors is not None
            return tensors
        header = self.broadcast_json(_header(tensors) if self.is_leader else None)
        out = {}
        for name, shape, dtype in header["tensors"]:
            buffer = (tensors[name].to(self.device).contiguous() if self.is_leader
                      else torch.empty(shape, dtype=getattr(torch, dtype), device=self.device))
            dist.broadcast(buffer, 0)
            out[name] = buffer.cpu()
        return out

    def send(self, tensors: dict[str, torch.Tensor], meta: dict, dst: int) -> None:
        """Send tensors and a JSON-able ``meta`` to rank ``dst`` (which calls :meth:`recv`)."""
        data = json.dumps({**_header(tensors), "meta": meta}).encode()
        dist.send(torch.tensor([len(data)], dtype=torch.int64, device=self.device), dst)
        dist.send(_as_bytes_tensor(data).to(self.device), dst)
        for name in sorted(tensors):
            dist.send(tensors[name].to(self.device).contiguous(), dst)

    def recv(self, src: int) -> tuple[dict[str, torch.Tensor], dict]:
        """What rank ``src`` sent with :meth:`send`: CPU tensors and the meta."""
        size = torch.zeros(1, dtype=torch.int64, device=self.device)
        dist.recv(size, src)
        buffer = torch.empty(int(size[0]), dtype=torch.uint8, device=self.device)
        dist.recv(buffer, src)
        header = json.loads(bytes(buffer.cpu().numpy()))
        tensors = {}
        for name, shape, dtype in header["tensors"]:
            tensor = torch.empty(shape, dtype=getattr(torch, dtype), device=self.device)
            dist.recv(tensor, src)
            tensors[name] = tensor.cpu()
        return tensors, header["meta"]

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()


def _as_bytes_tensor(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def _header(tensors: dict[str, torch.Tensor]) -> dict:
    return {"tensors": [[name, list(tensors[name].shape), str(tensors[name].dtype).removeprefix("torch.")]
                        for name in sorted(tensors)]}


@contextmanager
def process_group(device: str) -> Iterator[Group]:
    """The torchrun process group for calibrating on ``device`` (NCCL for CUDA, gloo for CPU), torn down after;
    the caller's group if torch.distributed is already initialized; a single process when not under torchrun."""
    cuda = torch.device(device).type == "cuda"
    if dist.is_initialized():
        yield Group(rank=dist.get_rank(), size=dist.get_world_size(), device=device if cuda else "cpu")
        return
    if not launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
        yield Group(device=device)
        return
    if cuda:
        torch.cuda.set_device(torch.device(device))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=CHUNK_TIMEOUT)
    try:
        yield Group(rank=dist.get_rank(), size=dist.get_world_size(), device=device if cuda else "cpu")
    finally:
        dist.destroy_process_group()
