"""torch.distributed for an engine's ranks: the process groups, and the messages of a step between ranks.

Groups (gloo on the CPU; all made by every rank, in the same order):
- the world group, with no practical timeout: the driver's step messages to every rank (a worker waits for the
  next step as long as the engine is idle) and the final stop;
- one tensor-parallel group per pipeline stage, and a pipeline group of all ranks (hidden states stage to stage,
  sampled tokens back to the driver), both with `timeout`: a rank that hangs inside a step makes the others fail
  with a timeout instead of waiting forever. Gloo closes the connection of a timed-out operation, so such a failure
  is final: the engine stops.

Messages are pickled objects (a step's StepInput, a ModelRunnerOutput) or raw tensors (hidden states, whose shape
the receiver knows from the step), sent with isend so the sender goes on computing; `Channel` keeps the sent
buffers alive until their sends complete.
"""

from __future__ import annotations

import datetime
import logging
import os
import pickle
from collections import deque
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from pagoda.parallel.comm import TPGroup
from pagoda.parallel.layout import ParallelConfig
from pagoda.parallel.shm import tp_group

logger = logging.getLogger("pagoda")

TAG_STEP, TAG_HIDDEN, TAG_RESULT, TAG_HELLO = 1, 2, 3, 4
FOREVER = datetime.timedelta(days=365)


class DistributedError(RuntimeError):
    """A rank died, hung past the timeout, or broke the protocol: the engine cannot go on."""


@dataclass
class Stop:
    """The driver's last message: leave the worker loop."""

    reason: str = "shutdown"


# Sends a channel keeps in flight before it waits for the oldest. Far more than the messages of the steps in flight
# (the pipeline stages), so the oldest send was received long ago and its wait returns at once.
MAX_PENDING_SENDS = 64


class Channel:
    """Point-to-point messages on one process group."""

    def __init__(self, group, timeout: datetime.timedelta | None):
        self.group = group
        self.timeout = timeout
        self._in_flight: deque[tuple[object, tuple[torch.Tensor, ...]]] = deque()

    def _track(self, work, *buffers: torch.Tensor) -> None:
        # A gloo send's work reports is_completed() only once it has been waited for (torch 2.13), so pruning by
        # is_completed kept every send and its buffer: the list, its scan per send and the memory grew with every
        # step (TP/PP serving slowed 2-3x after a few thousand steps). Waiting for the oldest keeps it bounded.
        self._in_flight.append((work, buffers))
        while len(self._in_flight) > MAX_PENDING_SENDS:
            oldest, _ = self._in_flight.popleft()
            try:
                oldest.wait() if self.timeout is None else oldest.wait(self.timeout)
            except RuntimeError as exc:
                raise DistributedError(f"a send did not complete: {exc}") from exc

    def send_object(self, obj: object, dst: int, tag: int) -> None:
        payload = torch.from_numpy(np.frombuffer(pickle.dumps(obj, protocol=5), dtype=np.uint8).copy())
        header = torch.tensor([payload.numel()], dtype=torch.int64)
        try:
            self._track(dist.isend(header, dst, group=self.group, tag=tag), header)
            self._track(dist.isend(payload, dst, group=self.group, tag=tag), payload)
        except RuntimeError as exc:
            raise DistributedError(f"sending to rank {dst} failed: {exc}") from exc

    def recv_object(self, src: int, tag: int) -> object:
        header = self.recv_tensor((1,), torch.int64, src, tag)
        payload = self.recv_tensor((int(header[0]),), torch.uint8, src, tag)
        return pickle.loads(payload.numpy().tobytes())

    def send_tensor(self, tensor: torch.Tensor, dst: int, tag: int) -> None:
        tensor = tensor.contiguous()
        try:
            self._track(dist.isend(tensor, dst, group=self.group, tag=tag), tensor)
        except RuntimeError as exc:
            raise DistributedError(f"sending to rank {dst} failed: {exc}") from exc

    def recv_tensor(self, shape: tuple[int, ...], dtype: torch.dtype, src: int, tag: int) -> torch.Tensor:
        out = torch.empty(shape, dtype=dtype)
        try:
            work = dist.irecv(out, src, group=self.group, tag=tag)
            work.wait() if self.timeout is None else work.wait(self.timeout)
        except RuntimeError as exc:
            raise DistributedError(f"receiving from rank {src} failed: {exc}") from exc
        return out

    def flush(self) -> None:
        """Wait for every send to complete (before leaving, so the last messages are not cut)."""
        for work, _ in self._in_flight:
            work.wait()
        self._in_flight.clear()


@dataclass
class Distributed:
    """This process's membership: its rank, its TP group, and the two channels."""

    rank: int
    world_size: int
    tp: TPGroup
    control: Channel  # world group: steps and the stop (no timeout)
    pipe: Channel  # all ranks, with the timeout: hidden states and results

    def close(self) -> None:
        try:
            self.control.flush()
            self.pipe.flush()
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()


def init_distributed(parallel: ParallelConfig, rank: int, init_method: str, timeout: float) -> Distributed:
    """Join the world (blocks until every rank has joined) and build the groups."""
    world = parallel.world_size
    backend = "gloo"
    # The world group never times out: workers wait on it for the next step. Per-step groups below do.
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world, timeout=FOREVER)
    step_timeout = datetime.timedelta(seconds=timeout)
    tp_size = parallel.tensor_parallel_size
    tp = TPGroup()
    for stage in range(parallel.pipeline_parallel_size):
        ranks = list(range(stage * tp_size, (stage + 1) * tp_size))
        group = dist.new_group(ranks, timeout=step_timeout, backend=backend)
        if rank in ranks and tp_size > 1:
            tp = tp_group(group, ranks, rank, timeout)
    pipe = dist.new_group(list(range(world)), timeout=step_timeout, backend=backend)
    logger.info("rank %d of %d joined (%s, pid %d)", rank, world, init_method, os.getpid())
    return Distributed(rank, world, tp, Channel(None, None), Channel(pipe, step_timeout))
