"""DDP on CPU (2 processes, gloo), started the way srun / torchrun start them: when one rank raises, every
process exits non-zero within a bounded time, and the failing rank's report says which rank and why."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest

BOUND_S = 60  # after the failing rank exited, the other one must be gone within this time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("failing_rank", [1])
def test_failing_rank_ends_the_whole_job(tmp_path, failing_rank):
    run_dir = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "sam_train.cli", "fit", "trainer=cpu", "trainer.devices=2", "trainer.strategy=ddp",
        f"run_dir={run_dir}", "trainer.max_steps=50", "trainer.enable_progress_bar=false", "data.val=null",
        "data.train.n=8", "data.batch_size=2", "prompts.num_iterations=2", "prompts.num_mask_only=1",
        "optim.scheduler.warmup_steps=1", "+callbacks.fault._target_=sam_train.callbacks.FaultInjection",
        "+callbacks.fault.step=2", f"+callbacks.fault.rank={failing_rank}",
    ]  # fmt: skip
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "PMI_", "OMPI_"))}
    base.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE="2", NODE_RANK="0",
                OMP_NUM_THREADS="1", HYDRA_FULL_ERROR="1")  # fmt: skip
    logs = [open(tmp_path / f"rank{r}.log", "w+") for r in range(2)]
    procs = [
        subprocess.Popen(cmd, env={**base, "LOCAL_RANK": str(r)}, stdout=logs[r], stderr=subprocess.STDOUT)
        for r in range(2)
    ]
    try:
        deadline = time.monotonic() + 240
        while all(p.poll() is None for p in procs):
            assert time.monotonic() < deadline, "no rank exited within 240 s"
            time.sleep(0.2)
        first_exit = time.monotonic()
        for p in procs:
            p.wait(timeout=max(1.0, BOUND_S - (time.monotonic() - first_exit)))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    outputs = []
    for log in logs:
        log.seek(0)
        outputs.append(log.read())
        log.close()
    codes = [p.returncode for p in procs]
    assert all(c != 0 for c in codes), (codes, outputs[0][-3000:], outputs[1][-3000:])
    assert procs[failing_rank].returncode == 1

    report = (run_dir / "failures" / f"rank{failing_rank}.txt").read_text()
    assert f"rank {failing_rank}/2" in report and "InjectedFault: injected fault at step 2" in report
    assert f"rank {failing_rank}/2" in outputs[failing_rank] and "InjectedFault" in outputs[failing_rank]
