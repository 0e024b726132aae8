"""A tensor-parallel group whose all-reduce goes through shared memory when all its ranks are on one host.

torch.distributed (gloo) still forms the group, exchanges the segment's name and carries every other collective
(the logits gather, the pipeline's messages); only the all-reduce that follows each row-parallel projection — two
per layer, the one collective on the critical path of every step — takes the shared-memory path
(kernels/shm_allreduce.cpp), because gloo's costs ~0.5-1 ms per call on the hosts measured (BENCHMARKS.md). Ranks
on different hosts, or PAGODA_TP_TRANSPORT=gloo, keep gloo's all-reduce.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
import socket
import uuid

import torch
import torch.distributed as dist

from pagoda import kernels
from pagoda.parallel.comm import DistributedTPGroup

logger = logging.getLogger("pagoda")

CAPACITY = 1 << 20  # floats per slot: a 512-token chunk of a 2048-wide model in one piece


def _host_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}"


def _library() -> ctypes.CDLL:
    lib = kernels.load("shm_allreduce")
    lib.shm_allreduce_bytes.argtypes = [ctypes.c_int64, ctypes.c_int64]
    lib.shm_allreduce_bytes.restype = ctypes.c_int64
    lib.shm_allreduce_init.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                                       ctypes.c_double, ctypes.c_int64]
    lib.shm_allreduce_init.restype = ctypes.c_int
    lib.shm_allreduce.argtypes = [ctypes.c_void_p, ctypes.c_int64]
    lib.shm_allreduce.restype = ctypes.c_int
    lib.shm_allreduce_failed.restype = ctypes.c_int
    lib.shm_allreduce_take_seconds.restype = ctypes.c_double
    return lib


class ShmTPGroup(DistributedTPGroup):
    transport = "shm"

    def __init__(self, group, ranks: list[int], rank: int, timeout: float):
        super().__init__(group, ranks, rank)
        self.lib = _library()
        size = self.lib.shm_allreduce_bytes(self.size, CAPACITY)
        names = [f"pagoda-tp-{uuid.uuid4().hex}" if self.rank == 0 else None]
        dist.broadcast_object_list(names, src=ranks[0], group=group)
        path = f"/dev/shm/{names[0]}"
        if self.rank == 0:
            with open(path, "wb") as f:
                f.truncate(size)  # zero-filled
        dist.barrier(group=group)
        with open(path, "r+b") as f:
            self._map = mmap.mmap(f.fileno(), size)
        dist.barrier(group=group)  # every rank has it mapped: the name can go
        if self.rank == 0:
            os.unlink(path)
        self._base = ctypes.addressof(ctypes.c_char.from_buffer(self._map))
        if self.lib.shm_allreduce_init(self._base, self.rank, self.size, CAPACITY, timeout, os.getpid()) != 0:
            raise RuntimeError("shared-memory all-reduce: bad arguments")
        # For the native decoder stack: a C function pointer, no Python per call.
        self.native_all_reduce = ctypes.cast(self.lib.shm_allreduce_void, ctypes.c_void_p).value

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if not x.is_contiguous() or x.dtype != torch.float32:
            raise ValueError("the shared-memory all-reduce takes contiguous fp32 tensors")
        if self.lib.shm_allreduce(x.data_ptr(), x.numel()) != 0:
            self.raise_if_failed()
        self.comm_calls += 1
        return x

    def take_native_seconds(self) -> float:
        """Seconds the native all-reduce spent since the last call (its calls from the decoder stack included)."""
        return self.lib.shm_allreduce_take_seconds()

    def raise_if_failed(self) -> None:
        if self.lib.shm_allreduce_failed():
            from pagoda.parallel.runtime import DistributedError

            raise DistributedError("a tensor-parallel peer died or did not answer within the timeout")


def tp_group(group, ranks: list[int], rank: int, timeout: float) -> DistributedTPGroup:
    """The TP group's best transport: shared memory when every rank is on this host, else gloo."""
    hosts: list = [None] * len(ranks)
    dist.all_gather_object(hosts, _host_id(), group=group)
    wanted = os.environ.get("PAGODA_TP_TRANSPORT", "auto")
    if wanted not in ("auto", "gloo", "shm"):
        raise ValueError(f"PAGODA_TP_TRANSPORT={wanted!r}: choose auto, shm or gloo")
    same_host = len(set(hosts)) == 1
    if wanted == "shm" and not same_host:
        raise ValueError("PAGODA_TP_TRANSPORT=shm, but the tensor-parallel ranks are on different hosts")
    if wanted != "gloo" and same_host:
        try:
            return ShmTPGroup(group, ranks, rank, timeout)
        except kernels.KernelBuildError as exc:
            logger.warning("shared-memory all-reduce unavailable (%s); using gloo's", str(exc).splitlines()[0])
    return DistributedTPGroup(group, ranks, rank)
