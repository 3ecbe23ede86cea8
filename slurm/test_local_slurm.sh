#!/usr/bin/env bash
# End-to-end requeue test on a real (local, one-node) Slurm: `make slurm-test`.
#
# Submits slurm/fit_single_node.sbatch as a 2-task CPU job (DDP over srun, vit_t, a few steps), sends
# SIGUSR1 once the first checkpoint exists (what Slurm sends before a time limit / preemption), and
# checks that Lightning requeued the job, that the rerun (SLURM_RESTART_COUNT=1) resumed from a
# checkpoint instead of step 0, and that the job then completed at max_steps. Exit 0 only if all pass.
#
# Environment: SAM_TRAIN (the sam-train executable, default: the repository's .venv),
# SLURM_TEST_STEPS (default 30), SLURM_TEST_OVERRIDES (the training config, default below),
# SLURM_TEST_TIMEOUT (seconds, default 600), SLURM_TEST_KEEP=1 keeps the work dir.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export SAM_TRAIN=${SAM_TRAIN:-$REPO/.venv/bin/sam-train}
STEPS=${SLURM_TEST_STEPS:-30}
TIMEOUT=${SLURM_TEST_TIMEOUT:-600}
EVERY=2  # checkpoint interval (steps)
read -r -a OVERRIDES <<<"${SLURM_TEST_OVERRIDES:-model=vit_t data=toy_shapes data.num_workers=0 data.batch_size=2 optim.scheduler.warmup_steps=1}"

log() { echo "[slurm-test $(date +%T)] $*"; }
eval "$(bash "$REPO/slurm/local_cluster.sh" start)"

WORK=$(mktemp -d /tmp/sam_train_slurm_test.XXXXXX)
RUN_DIR=$WORK/run
OUT=$WORK/job.out
JOB=
cleanup() {
    [[ -n $JOB ]] && scancel "$JOB" 2>/dev/null || true
    [[ ${SLURM_TEST_KEEP:-0} == 1 ]] && log "kept $WORK" || rm -rf "$WORK"
}
trap cleanup EXIT

job_state() { scontrol show job "$JOB" 2>/dev/null | sed -n 's/.*JobState=\([A-Z_]*\).*/\1/p'; }
wait_for() {  # wait_for DESCRIPTION COMMAND...: poll until COMMAND succeeds or the job ends / time runs out
    local what=$1 state
    shift
    while ! "$@"; do
        state=$(job_state)
        case $state in FAILED | CANCELLED | TIMEOUT | NODE_FAIL | OUT_OF_MEMORY | BOOT_FAIL | DEADLINE | "")
            log "job $JOB ended ($state) while waiting for: $what"; return 1 ;;
        esac
        ((SECONDS < TIMEOUT)) || { log "timed out waiting for: $what"; return 1; }
        sleep 1
    done
}

cd "$REPO"
# CPU job: command-line sbatch options override the script's GPU directives. Checkpoints every EVERY
# steps without a monitored metric (Lightning defers monitored step checkpoints until validation).
JOB=$(sbatch --parsable --job-name=sam-slurm-test --nodes=1 --ntasks-per-node=2 --cpus-per-task=1 \
    --gpus-per-node=0 --time=15 --output="$OUT" slurm/fit_single_node.sbatch \
    "${OVERRIDES[@]}" "run_dir=$RUN_DIR" "trainer.max_steps=$STEPS" trainer.accelerator=cpu trainer.strategy=ddp \
    trainer.enable_progress_bar=false "callbacks.model_checkpoint.every_n_train_steps=$EVERY" \
    callbacks.model_checkpoint.monitor=null)
log "submitted job $JOB (2 tasks, $STEPS steps), output $OUT"

# Signal as soon as the first checkpoint exists: training is under way, Lightning's handler is set.
wait_for "first checkpoint" test -f "$RUN_DIR/checkpoints/last.ckpt"
log "first checkpoint after ${SECONDS}s; sending SIGUSR1 (as before a time limit)"
scancel --signal=USR1 "$JOB"

restarted() { grep -q 'SLURM_RESTART_COUNT=1' "$OUT"; }
wait_for "the requeued rerun" restarted
log "job requeued and restarted after ${SECONDS}s"
finished() { [[ $(job_state) == COMPLETED ]]; }
wait_for "job completion" finished
log "job completed after ${SECONDS}s"

# Checks (all reported, then one verdict).
FAILS=0
check() {  # check DESCRIPTION COMMAND...
    local what=$1
    shift
    if "$@"; then log "PASS: $what"; else log "FAIL: $what"; FAILS=$((FAILS + 1)); fi
}
rerun_log() { sed -n '/SLURM_RESTART_COUNT=1/,$p' "$OUT"; }
ckpt_step() {  # global_step stored in a Lightning checkpoint
    "$REPO/.venv/bin/python" -c 'import sys, torch; print(torch.load(sys.argv[1], map_location="cpu", weights_only=False)["global_step"])' "$1"
}
# Lightning names the checkpoint it restores. Its requeue checkpoint (hpc_ckpt_N) is never overwritten;
# last.ckpt is, but before the signal it only held steps EVERY, 2*EVERY, ... <= the signal's step.
HPC=$(find "$RUN_DIR" -maxdepth 1 -name 'hpc_ckpt_*.ckpt' | head -1)
HPC_STEP=$( [[ -n $HPC ]] && ckpt_step "$HPC" || echo 0)
RESTORED=$(rerun_log | sed -n 's/.*Restoring states from the checkpoint path at \([^ ]*\.ckpt\).*/\1/p' | head -1)
case $RESTORED in
    "") RESUME_STEP=0 ;;
    */checkpoints/last.ckpt) RESUME_STEP=$EVERY ;;
    *) RESUME_STEP=$(ckpt_step "$RESTORED" || echo 0) ;;
esac
FINAL_STEP=$(ckpt_step "$RUN_DIR/checkpoints/last.ckpt" || echo -1)
check "job state is COMPLETED (scontrol: $(job_state), $(scontrol show job "$JOB" | grep -o 'Restarts=[0-9]*'))" finished
check "Lightning handled SIGUSR1 and requeued the job" grep -q "Handling auto-requeue signal\|Requeued SLURM job\|requeing job" "$OUT"
check "Lightning saved its requeue checkpoint (${HPC:-none}, step $HPC_STEP)" test -n "$HPC"
check "the rerun ran with SLURM_RESTART_COUNT=1" restarted
check "the rerun resumed from a checkpoint (${RESTORED:-none}, step >= $RESUME_STEP), not step 0" test "$RESUME_STEP" -gt 0
check "training finished at max_steps (last.ckpt step $FINAL_STEP == $STEPS)" test "$FINAL_STEP" -eq "$STEPS"

if ((FAILS)); then
    log "---- job output ($OUT) ----"
    cat "$OUT"
    log "SUMMARY: FAIL ($FAILS check(s) failed) in ${SECONDS}s"
    exit 1
fi
log "SUMMARY: PASS (requeue + resume on a real Slurm) in ${SECONDS}s"
