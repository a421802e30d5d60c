"""Sharded runs over ``torch.distributed``: one process per device (or per CPU share), each taking every
``world``-th image; results gathered through files (durable, so an interrupted run resumes) and a
collective at the end.

Two ways in, one code path:
- ``torchrun --nproc_per_node N -m apps.cli eval ...`` (or ``groundseg eval`` under torchrun): the process
  group comes from torchrun's environment (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``...);
- ``groundseg eval --num-procs N``: :func:`spawn` starts N local processes on a free loopback port.
The backend is ``nccl`` when each rank has a CUDA device, else ``gloo``.
"""
from __future__ import annotations

import os
import socket
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch.multiprocessing import ProcessExitedException


@dataclass(frozen=True)
class Shard:
    """This process's place in a sharded run: ``rank`` in ``0..world-1``."""
    rank: int
    world: int

    def all_gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (picklable), in rank order; a barrier as well."""
        if self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def device(self, requested: str = "auto") -> str:
        """The device of this rank: ``cuda:{local rank}`` when CUDA is there and ``requested`` allows it."""
        if requested in ("auto", "cuda") and torch.cuda.is_available():
            return f"cuda:{int(os.environ.get('LOCAL_RANK', self.rank)) % torch.cuda.device_count()}"
        return requested if requested != "auto" else "cpu"


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def init_from_env() -> Shard:
    """Join the process group torchrun describes (once); a single process gets ``Shard(0, 1)``."""
    if not launched_by_torchrun():
        return Shard(0, 1)
    if not dist.is_initialized():
        backend = _backend()
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
        dist.init_process_group(backend)
    return Shard(dist.get_rank(), dist.get_world_size())


def spawn(fn: Callable[..., Any], num_procs: int, *args: Any) -> None:
    """Run ``fn(shard, *args)`` in ``num_procs`` new local processes joined in one process group; returns
    when all have finished (an exception in any is raised here, and a process killed before its ``fn``
    returned). CPU threads are split between them."""
    port = _free_port()
    with tempfile.TemporaryDirectory(prefix="groundseg-ranks-") as done_dir:
        try:
            torch.multiprocessing.start_processes(_worker, args=(fn, num_procs, port, done_dir, args),
                                                  nprocs=num_procs, start_method="spawn", join=True)
        except ProcessExitedException as err:
            # gloo now and then aborts a process while it leaves the group ("terminate called without an active
            # exception"), even after the barrier in shutdown(); its work was done and written by then
            if not all((Path(done_dir) / str(rank)).exists() for rank in range(num_procs)):
                raise
            warnings.warn(f"a rank died while leaving the process group, after finishing its work ({err})")


def _worker(rank: int, fn: Callable[..., Any], world: int, port: int, done_dir: str, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    backend = _backend()
    if backend == "nccl":
        torch.cuda.set_device(rank % torch.cuda.device_count())
    dist.init_process_group(backend, rank=rank, world_size=world)
    try:
        fn(Shard(rank, world), *args)
    except BaseException:
        dist.destroy_process_group()
        raise
    (Path(done_dir) / str(rank)).touch()
    shutdown()


def shutdown() -> None:
    """Leave the process group together: a barrier first, so no rank tears gloo down while another still
    talks to it (that aborts the process: "terminate called without an active exception")."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _backend() -> str:
    return "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
