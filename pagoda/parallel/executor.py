"""The driver's side of a parallel engine: start (or join) the worker ranks, and run steps on all of them.

The driver is rank 0 (pipeline stage 0, TP rank 0): it owns the one scheduler and KV block manager, so every rank
uses the driver's block tables. Per step it sends the StepInput to every other rank, runs its own shard, and gets
the sampled tokens from the last stage. With pipeline parallelism `submit` returns once the driver's stage is
done, so the engine can put up to `max_in_flight` (= stages) batches in flight and every stage works at once.

spawned workers: one that dies marks the executor dead at once, so the engine stops even while idle. `shutdown`
`node_rank`/`master_addr`, joined at the given address. A monitor thread watches spawned workers: one that dies
marks the executor dead at once, so the engine stops even while idle. `shutdown` stops every worker, and kills the
ones that do not leave in time; a spawned worker also leaves when its parent is gone.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from pagoda.config import EngineConfig
from pagoda.core.outputs import ModelRunnerOutput, SchedulerOutput
from pagoda.execution_plan import ExecutionPlan
from pagoda.parallel.runtime import TAG_HELLO, TAG_RESULT, TAG_STEP, DistributedError, Stop, init_distributed
from pagoda.parallel.worker import StageWorker, spawn_worker
from pagoda.worker.step_input import build_step_input

logger = logging.getLogger("pagoda")


@dataclass(frozen=True)
class Launch:
    """How this process meets the other ranks. `node_rank`/`nnodes`: this node's place when ranks run on several
    machines (ranks are numbered node by node); `spawn`: start this node's worker ranks here."""

    init_method: str
    nnodes: int = 1
    node_rank: int = 0
    spawn: bool = True
    local_ranks: int | None = None  # ranks on this machine (default: world / nnodes)

    @classmethod
    def local(cls) -> Launch:
        return cls(f"tcp://127.0.0.1:{free_port()}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def threads_per_rank(config: EngineConfig, local_ranks: int) -> int:
    return config.threads_per_rank or max(1, (os.cpu_count() or 1) // local_ranks)


class DistributedExecutor:
    def __init__(self, config: EngineConfig, path: Path, launch: Launch, num_layers: int,
                 on_dead: Callable[[BaseException], None] | None = None, progress: bool = False):
        parallel = config.parallel
        self.world_size = parallel.world_size
        if self.world_size % launch.nnodes:
            raise ValueError(f"{self.world_size} ranks do not split over {launch.nnodes} nodes")
        local = launch.local_ranks or self.world_size // launch.nnodes
        if launch.node_rank != 0:
            raise ValueError("the driver (rank 0) runs on node 0; other nodes run worker ranks only")
        threads = threads_per_rank(config, local)
        torch.set_num_threads(threads)
        self.max_in_flight = parallel.pipeline_parallel_size
        self.dead_error: BaseException | None = None
        self._on_dead = on_dead
        self._processes: list[subprocess.Popen] = []
        if launch.spawn:
            self._processes = [spawn_worker(config, str(path), rank, launch.init_method, threads)
                               for rank in range(1, local)]
        try:
            self.comm = init_distributed(parallel, 0, launch.init_method, config.distributed_timeout)
            self.worker = StageWorker(config, path, self.comm, num_layers, progress=progress)
            self.plans: list[ExecutionPlan] = [self.worker.loaded.plan] + [
                self.comm.pipe.recv_object(rank, TAG_HELLO) for rank in range(1, self.world_size)]
        except BaseException:
            self._kill_workers()
            raise
        self._check_plans()
        self._stopping = False
        for rank, process in enumerate(self._processes, start=1):
            threading.Thread(target=self._monitor, args=(rank, process), name=f"pagoda-watch-rank{rank}",
                             daemon=True).start()
        logger.info("%d ranks ready (tensor parallel %d x pipeline parallel %d, %d threads each)", self.world_size,
                    parallel.tensor_parallel_size, parallel.pipeline_parallel_size, threads)

    @property
    def loaded(self):
        return self.worker.loaded

    @property
    def runner(self):
        return self.worker.runner

    def _check_plans(self) -> None:
        blocks = {p.kv_cache_blocks for p in self.plans}
        dtypes = {p.kv_cache_dtype for p in self.plans}
        if len(blocks) > 1 or len(dtypes) > 1:
            raise DistributedError(f"the ranks disagree on the KV cache ({sorted(blocks)} blocks, {sorted(dtypes)}); "
                                   "give every node the same flags")

    # ---- steps --------------------------------------------------------------------------------------------

    def submit(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput | None:
        """Start a step on every rank and run the driver's part. Returns the result when the driver samples
        (one pipeline stage), else None: `collect` it later, in submission order."""
        self._check_alive()
        step = build_step_input(scheduler_output, self.worker.runner.block_size)
        message = step.for_workers()
        try:
            for rank in range(1, self.world_size):
                self.comm.control.send_object(message, rank, TAG_STEP)
            return self.worker.execute(step)
        except Exception as exc:
            raise self._fail(exc) from exc

    def collect(self) -> ModelRunnerOutput:
        """The sampled tokens of the oldest step in flight (pipeline parallelism)."""
        try:
            result = self.comm.pipe.recv_object(self.worker.last_stage_sampler, TAG_RESULT)
        except Exception as exc:
            raise self._fail(exc) from exc
        return result

    def _check_alive(self) -> None:
        if self.dead_error is not None:
            raise DistributedError(str(self.dead_error))

    def _fail(self, exc: BaseException) -> DistributedError:
        error = exc if isinstance(exc, DistributedError) else DistributedError(f"a rank failed: {exc}")
        if self.dead_error is None:
            self.dead_error = error
        return error

    # ---- processes ----------------------------------------------------------------------------------------

    def _monitor(self, rank: int, process: subprocess.Popen) -> None:
        code = process.wait()
        if self._stopping:
            return
        error = DistributedError(f"worker rank {rank} (pid {process.pid}) exited with code {code}")
        logger.error("%s; the engine stops", error)
        self.dead_error = self.dead_error or error
        if self._on_dead is not None:
            self._on_dead(error)

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stopping = True
        if self.dead_error is None:
            try:
                for rank in range(1, self.world_size):
                    self.comm.control.send_object(Stop(), rank, TAG_STEP)
                self.comm.control.flush()
            except Exception as exc:  # noqa: BLE001 - a rank is gone already: kill the rest below
                logger.warning("stopping the ranks: %s", exc)
        deadline = time.monotonic() + timeout
        for process in self._processes:
            try:
                process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        self._kill_workers()
        if self.dead_error is None:  # with a rank gone, tearing the groups down could wait on it
            try:
                self.comm.close()
            except Exception:  # noqa: BLE001 - leaving anyway
                pass

    def _kill_workers(self) -> None:
        for process in self._processes:
            if process.poll() is None:
                process.kill()
                process.wait(5)
