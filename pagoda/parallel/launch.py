"""How a `pagoda` process finds its place among an engine's ranks: spawned locally, started by torchrun, or one
node of a multi-machine launch with --nnodes / --node-rank / --master-addr / --master-port.

Rank 0 is the driver (it schedules and serves HTTP); every other process runs worker ranks and serves steps until
the driver stops them.

- One machine: `pagoda serve -tp 2` spawns rank 1 itself (parallel/executor.py).
- torchrun: every process of `torchrun --nnodes K --node-rank R --nproc-per-node P --master-addr H --master-port Q
  -m pagoda serve MODEL -tp N -pp M` reads RANK / WORLD_SIZE / LOCAL_WORLD_SIZE from the environment and joins
  with init_method env://; N x M must equal WORLD_SIZE.
- Without torchrun: `pagoda serve ... --nnodes K --node-rank R --master-addr H --master-port Q` on every node; node R
  spawns ranks [R x L, (R + 1) x L), L = world / K, and node 0's first rank is the driver.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

from pagoda.config import EngineConfig
from pagoda.parallel.executor import Launch, threads_per_rank
from pagoda.parallel.worker import spawn_worker, worker_main

_TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class ProcessLaunch:
    rank: int  # the first rank this process runs (0: the driver)
    world_size: int
    local_ranks: int  # ranks this process's node runs
    executor_launch: Launch  # how the driver meets the workers
    torchrun: bool

    @property
    def is_driver(self) -> bool:
        return self.rank == 0


def launch_for(config: EngineConfig, nnodes: int = 1, node_rank: int = 0, master_addr: str = "127.0.0.1",
               master_port: int = 29500) -> ProcessLaunch | None:
    """This process's launch, or None for a single-rank engine."""
    world = config.parallel.world_size
    env = os.environ
    if all(k in env for k in _TORCHRUN_ENV) and int(env["WORLD_SIZE"]) > 1:
        rank, size = int(env["RANK"]), int(env["WORLD_SIZE"])
        if size != world:
            raise ValueError(f"torchrun started {size} processes, but tensor x pipeline parallel size is {world}")
        local = int(env.get("LOCAL_WORLD_SIZE", size))
        return ProcessLaunch(rank, world, local, Launch("env://", spawn=False, local_ranks=local), torchrun=True)
    if world == 1:
        return None
    if nnodes < 1 or not 0 <= node_rank < nnodes or world % nnodes:
        raise ValueError(f"--nnodes {nnodes} / --node-rank {node_rank} do not split {world} ranks evenly")
    if nnodes == 1:
        return ProcessLaunch(0, world, world, Launch.local(), torchrun=False)
    local = world // nnodes
    init = f"tcp://{master_addr}:{master_port}"
    return ProcessLaunch(node_rank * local, world, local, Launch(init, nnodes, node_rank), torchrun=False)


def run_worker_node(config: EngineConfig, launch: ProcessLaunch) -> None:
    """Serve steps as this process's worker rank(s) until the driver stops them; exits the process."""
    from pagoda.model_store import resolve_model

    path = str(resolve_model(config.model))
    threads = threads_per_rank(config, launch.local_ranks)
    init = launch.executor_launch.init_method
    if launch.torchrun:
        worker_main(config, path, launch.rank, init, threads, spawned=False)  # does not return
    processes = [spawn_worker(config, path, rank, init, threads)
                 for rank in range(launch.rank, launch.rank + launch.local_ranks)]
    try:
        codes = [p.wait() for p in processes]
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
    sys.exit(max(codes))
