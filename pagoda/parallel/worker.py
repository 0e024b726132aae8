"""One rank of a parallel engine: its shard of the model, and its part of every step.

`StageWorker.execute(step)` is the same on every rank, the driver included: receive the previous stage's hidden
states (after the first stage), run this shard (its TP collectives happen inside), then send the hidden states to
the next stage, or, on the last stage, compute logits and (TP rank 0 of it) sample. Worker ranks run `serve_steps`:
wait for the driver's next step, execute, send the sampled tokens back, until the driver says stop or goes away.
"""

from __future__ import annotations

import logging
import os
import pickle
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

from pagoda.config import EngineConfig
from pagoda.core.outputs import ModelRunnerOutput
from pagoda.parallel.layout import rank_layout
from pagoda.parallel.runtime import TAG_HELLO, TAG_HIDDEN, TAG_RESULT, TAG_STEP, Distributed, Stop, init_distributed
from pagoda.worker.model_loader import load_model
from pagoda.worker.model_runner import ModelRunner
from pagoda.worker.step_input import StepInput

logger = logging.getLogger("pagoda")


class StageWorker:
    def __init__(self, config: EngineConfig, path: Path, comm: Distributed, num_layers: int, progress: bool = False):
        self.comm = comm
        self.layout = rank_layout(config.parallel, comm.rank, num_layers)
        loaded = load_model(path, config, self.layout, comm.tp, progress=progress)
        self.loaded = loaded
        self.hidden_size = loaded.config.hidden_size
        self.runner = ModelRunner(loaded.model, loaded.config, loaded.kv_caches, config.block_size, loaded.backend,
                                  torch.device(config.device), loaded.native_stack)
        self.compute_seconds = 0.0  # time in this rank's forward, collectives excluded (benchmarks)

    @property
    def last_stage_sampler(self) -> int:
        """The rank that samples: TP rank 0 of the last stage."""
        return self.layout.stage_rank(self.layout.pp_size - 1, 0)

    def execute(self, step: StepInput) -> ModelRunnerOutput | None:
        layout = self.layout
        hidden = None
        if not layout.is_first_stage:
            hidden = self.comm.pipe.recv_tensor((step.num_tokens, self.hidden_size), torch.float32,
                                                layout.stage_rank(layout.pp_rank - 1), TAG_HIDDEN)
        start, comm_before = time.perf_counter(), self.comm.tp.comm_seconds
        out = self.runner.run(step, hidden)
        self.compute_seconds += time.perf_counter() - start - (self.comm.tp.comm_seconds - comm_before)
        if not layout.is_last_stage:
            self.comm.pipe.send_tensor(out.to(torch.float32), layout.stage_rank(layout.pp_rank + 1), TAG_HIDDEN)
            return None
        return out

    def serve_steps(self) -> str:
        """The worker loop; returns why it ended."""
        while True:
            message = self.comm.control.recv_object(0, TAG_STEP)
            if isinstance(message, Stop):
                return message.reason
            result = self.execute(message)
            if result is not None:
                self.comm.pipe.send_object(result, 0, TAG_RESULT)


def _die_with_parent() -> None:
    """Leave when the process that spawned this one is gone (killed, crashed), so no worker outlives a server.
    A watcher thread, not PR_SET_PDEATHSIG, which fires when the spawning *thread* ends (the server loads the
    engine on a short-lived thread)."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="pagoda-parent-watch", daemon=True).start()


def worker_main(config: EngineConfig, path: str, rank: int, init_method: str, threads: int,
                spawned: bool = True) -> None:
    """Entry point of a worker rank (a spawned process, or a torchrun process with rank > 0)."""
    if spawned:
        _die_with_parent()
        logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                            format=f"%(asctime)s %(levelname)s rank{rank}: %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(threads)
    from pagoda.loader import open_checkpoint

    num_layers = open_checkpoint(path).config.num_hidden_layers
    comm = init_distributed(config.parallel, rank, init_method, config.distributed_timeout)
    code = 0
    try:
        worker = StageWorker(config, Path(path), comm, num_layers)
        comm.pipe.send_object(worker.loaded.plan, 0, TAG_HELLO)
        reason = worker.serve_steps()
        logger.info("rank %d stops: %s", rank, reason)
    except Exception as exc:  # noqa: BLE001 - the driver sees the broken connection; say why here
        logger.error("rank %d failed: %s", rank, exc)
        code = 1
    finally:
        try:
            comm.close()
        except Exception:  # noqa: BLE001 - leaving anyway
            pass
    os._exit(code)  # skip interpreter teardown: gloo threads may still hold a dead peer's socket


def spawn_worker(config: EngineConfig, path: str, rank: int, init_method: str, threads: int) -> subprocess.Popen:
    """Start worker rank `rank` as `python -m pagoda.parallel.worker`, its arguments pickled on stdin. A fresh
    interpreter (not multiprocessing), so a user's script needs no `if __name__ == "__main__"` guard."""
    process = subprocess.Popen([sys.executable, "-m", "pagoda.parallel.worker"], stdin=subprocess.PIPE,
                               env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    process.stdin.write(pickle.dumps((config, path, rank, init_method, threads)))
    process.stdin.close()
    return process


if __name__ == "__main__":
    worker_main(*pickle.loads(sys.stdin.buffer.read()))
