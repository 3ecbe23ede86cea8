"""Multi-process failures: say which rank failed and why, and do not leave the other ranks hanging."""

from __future__ import annotations

import logging
import os
import signal
import socket
import traceback
from pathlib import Path

import lightning.pytorch as pl

log = logging.getLogger(__name__)


class RankFailureReporter(pl.Callback):
    """On an exception in any rank: logs `rank R/W (host, pid) failed at step S: Type: message`, writes it
    to `<root>/failures/rank<R>.txt`, and (rank 0 with Lightning's own launcher) kills the worker
    processes it started, which would otherwise wait in a collective until the process-group timeout.

    A rank that fails *because* another one died (a broken collective) also names the reports already
    written by the others, so the first failure is easy to find. Under srun (`--kill-on-bad-exit=1`,
    see slurm/launch.sh) or torchrun, the launcher ends the other ranks; Lightning's launcher kills the
    others when a worker fails.
    """

    def __init__(self, *, dirname: str = "failures") -> None:
        self.dirname = dirname

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, (SystemExit, KeyboardInterrupt)) or trainer.world_size <= 1:
            return  # preemption / Ctrl+C are not failures; a single process reports its own traceback
        rank, world = trainer.global_rank, trainer.world_size
        where = f"rank {rank}/{world} ({socket.gethostname()}, pid {os.getpid()})"
        message = f"{where} failed at step {trainer.global_step}: {type(exception).__name__}: {exception}"
        directory = Path(trainer.default_root_dir) / self.dirname
        others = sorted(p.name for p in directory.glob("rank*.txt")) if directory.is_dir() else []
        if others:
            message += f" (reports of other ranks: {', '.join(str(directory / o) for o in others)})"
        log.error(message)
        try:
            directory.mkdir(parents=True, exist_ok=True)
            text = message + "\n\n" + "".join(traceback.format_exception(exception))
            (directory / f"rank{rank}.txt").write_text(text)
        except OSError as err:  # reporting must never hide the original error
            log.error("could not write the failure report: %s", err)
        launcher = trainer.strategy.launcher
        procs = getattr(launcher, "procs", None)
        if rank == 0 and procs:
            # Lightning's launcher started the other ranks from this process: end them now rather than
            # after the collective timeout (NCCL does not notice a dead peer by itself).
            log.error("rank 0 failed: killing the %d worker process(es) it launched", len(procs))
            launcher.kill(signal.SIGKILL)
