#!/usr/bin/env bash
# End-to-end requeue test on a real (local, one-node) Slurm: `make slurm-test`.
#
# Submits slurm/fit_single_node.sbatch as a 2-task CPU job (DDP over srun, vit_t, a few steps) with
# the periodic checkpoint only at the last step, sends SIGUSR1 once training is under way (what Slurm
# sends before a time limit or preemption), and checks: the job was requeued, the rerun
# (SLURM_RESTART_COUNT=1) resumed from the checkpoint saved on the signal (not step 0), and the job
# then completed at max_steps. Exit 0 only if every check passes.
#   bash slurm/test_local_slurm.sh                                        # sam-train fit
#   SLURM_TEST_SCRIPT=slurm/pretrain_mae.sbatch bash slurm/test_local_slurm.sh   # sam-train pretrain
#
# Environment: SAM_TRAIN (the sam-train executable, default: the repository's .venv),
# SLURM_TEST_SCRIPT (default slurm/fit_single_node.sbatch), SLURM_TEST_STEPS (default 16 for fit, 160 for pretrain),
# SLURM_TEST_OVERRIDES (the training config, default below per script),
# SLURM_TEST_TIMEOUT (seconds, default 600), SLURM_TEST_KEEP=1 keeps the work dir.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export SAM_TRAIN=${SAM_TRAIN:-$REPO/.venv/bin/sam-train}
SCRIPT=${SLURM_TEST_SCRIPT:-slurm/fit_single_node.sbatch}
TIMEOUT=${SLURM_TEST_TIMEOUT:-600}
# enough steps that training is still running when the signal lands: a tiny-MAE step takes ~35 ms on
# a quiet CPU (16 steps ended before the poll below could see step 2), a vit_t SAM step much longer
case $SCRIPT in
    *pretrain*) DEFAULT_OVERRIDES="recipe=mae_tiny_demo mae_data.num_workers=0 mae_data.batch_size=2"
                DEFAULT_STEPS=160 ;;
    *) DEFAULT_OVERRIDES="model=vit_t data=toy_shapes data.num_workers=0 data.batch_size=2 optim.scheduler.warmup_steps=1"
       DEFAULT_STEPS=16 ;;
esac
STEPS=${SLURM_TEST_STEPS:-$DEFAULT_STEPS}
read -r -a OVERRIDES <<<"${SLURM_TEST_OVERRIDES:-$DEFAULT_OVERRIDES}"

log() { echo "[slurm-test $(date +%T)] $*"; }
die() {  # the job cannot reach the checks: show its output
    log "---- job output ($OUT) ----"
    cat "$OUT" 2>/dev/null || true
    log "SUMMARY: FAIL ($*) in ${SECONDS}s"
    exit 1
}
eval "$(bash "$REPO/slurm/local_cluster.sh" start)"

WORK=$(mktemp -d /tmp/sam_train_slurm_test.XXXXXX)
RUN_DIR=$WORK/run
OUT=$WORK/job.out
JOB=
cleanup() {
    if [[ -n $JOB && $(job_state) != COMPLETED ]]; then scancel "$JOB" 2>/dev/null || true; fi
    if [[ ${SLURM_TEST_KEEP:-0} == 1 ]]; then log "kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

job_state() { scontrol show job "$JOB" 2>/dev/null | sed -n 's/.*JobState=\([A-Z_]*\).*/\1/p'; }
wait_for() {  # wait_for DESCRIPTION COMMAND...: poll until COMMAND succeeds; fail if the job ends first
    local what=$1 state
    shift
    until "$@"; do
        state=$(job_state)
        case $state in PENDING | CONFIGURING | RUNNING | COMPLETING | REQUEUED | REQUEUE_HOLD | REQUEUE_FED) ;;
            *) log "job $JOB is ${state:-gone} while waiting for: $what"; return 1 ;;
        esac
        ((SECONDS < TIMEOUT)) || { log "timed out waiting for: $what"; return 1; }
        sleep 0.5
    done
}

cd "$REPO"
# CPU job: command-line sbatch options override the script's GPU directives. The periodic and the
# epoch-end checkpoints come only at the last step (an MNI MAE epoch is ~10 steps: on a loaded machine
# the poll below can see step 2 after the first epoch ended), so a checkpoint the rerun finds was saved
# on the signal; the CSV logger writes every step, so the test sees training progress.
JOB=$(sbatch --parsable --job-name=sam-slurm-test --nodes=1 --ntasks-per-node=2 --cpus-per-task=1 \
    --gpus-per-node=0 --time=15 --output="$OUT" "$SCRIPT" \
    "${OVERRIDES[@]}" "run_dir=$RUN_DIR" "trainer.max_steps=$STEPS" trainer.accelerator=cpu trainer.strategy=ddp \
    trainer.enable_progress_bar=false "callbacks.model_checkpoint.every_n_train_steps=$STEPS" \
    "callbacks.epoch_checkpoint.every_n_epochs=$STEPS" \
    trainer.log_every_n_steps=1 +logger.csv.flush_logs_every_n_steps=1)
log "submitted job $JOB ($SCRIPT: 2 tasks, $STEPS steps), output $OUT"

trained_steps() {  # has the CSV logger recorded step >= $1?
    awk -F, -v min="$1" 'NR == 1 { for (i = 1; i <= NF; i++) if ($i == "step") c = i; next }
        c && $c != "" && $c + 0 >= min { found = 1 } END { exit !found }' "$RUN_DIR/logs/metrics.csv" 2>/dev/null
}
wait_for "training step 2" trained_steps 2 || die "training did not start"
CKPTS_BEFORE=$(find "$RUN_DIR" -name '*.ckpt' | wc -l)
log "training under way after ${SECONDS}s ($CKPTS_BEFORE checkpoints); sending SIGUSR1 (as before a time limit)"
scancel --signal=USR1 "$JOB"

# The batch script prints SLURM_RESTART_COUNT before srun: the rerun has not written anything yet, so
# last.ckpt is still the one saved on the signal (written by an atomic rename): keep a copy.
restarted() { grep -q 'SLURM_RESTART_COUNT=1' "$OUT"; }
wait_for "the requeued rerun" restarted || die "the job was not requeued"
cp "$RUN_DIR/checkpoints/last.ckpt" "$WORK/signal.ckpt" 2>/dev/null || true
log "job requeued and restarted after ${SECONDS}s"
finished() { [[ $(job_state) == COMPLETED ]]; }
wait_for "job completion" finished || true
log "job ended after ${SECONDS}s"

# global_step of the checkpoint saved on the signal and of the final one (-1: missing / unreadable).
read -r SIGNAL_STEP FINAL_STEP < <("$REPO/.venv/bin/python" - "$WORK/signal.ckpt" "$RUN_DIR/checkpoints/last.ckpt" <<'EOF'
import sys, torch
def step(path):
    try:
        return torch.load(path, map_location="cpu", weights_only=False)["global_step"]
    except Exception:
        return -1
print(*(step(p) for p in sys.argv[1:]))
EOF
)
RESTORED=$(sed -n '/SLURM_RESTART_COUNT=1/,$p' "$OUT" |
    sed -n 's/.*Restoring states from the checkpoint path at \([^ ]*\.ckpt\).*/\1/p' | head -1)

FAILS=0
check() {  # check DESCRIPTION COMMAND...
    local what=$1
    shift
    if "$@"; then log "PASS: $what"; else log "FAIL: $what"; FAILS=$((FAILS + 1)); fi
}
restarts() { scontrol show job "$JOB" | sed -n 's/.*Restarts=\([0-9]*\).*/\1/p'; }
completed_once() { [[ $(job_state) == COMPLETED && $(restarts) == 1 ]]; }
check "job COMPLETED after one requeue (scontrol: $(job_state), Restarts=$(restarts))" completed_once
check "no checkpoint existed before the signal ($CKPTS_BEFORE)" test "$CKPTS_BEFORE" -eq 0
check "the rerun ran with SLURM_RESTART_COUNT=1" restarted
check "a checkpoint was saved on the signal (step $SIGNAL_STEP)" test "$SIGNAL_STEP" -ge 2
check "the rerun resumed from it (${RESTORED:-nothing restored}), not from step 0" \
    test "$RESTORED" == "$RUN_DIR/checkpoints/last.ckpt"
check "training finished at max_steps (last.ckpt step $FINAL_STEP == $STEPS)" test "$FINAL_STEP" -eq "$STEPS"

((FAILS == 0)) || die "$FAILS check(s) failed"
log "SUMMARY: PASS (signal -> checkpoint -> requeue -> resume on a real Slurm) in ${SECONDS}s"
