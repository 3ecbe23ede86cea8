# Shared body of the sbatch scripts in slurm/ (sourced, not run): `sam_train_srun COMMAND [key=value ...]`
# starts one `sam-train COMMAND` per Slurm task with srun; Lightning's SLURM environment then takes
# rank, world size and MASTER_ADDR from srun's variables. On SIGUSR1 (--signal) all ranks save
# <run_dir>/checkpoints/last.ckpt at the next step boundary, rank 0 runs `scontrol requeue`, every task
# exits with code 75 (so does the batch script); the requeued job resumes from last.ckpt.
#
# Set by this helper (your overrides come after them, so they win):
#   trainer.devices    = tasks per node (one task per GPU)
#   trainer.num_nodes  = nodes of the allocation
#   run_dir            = runs/<name>/slurm-<job id> unless you pass run_dir=...: every task and every
#                        requeue of the job must agree on it (the default one contains a timestamp),
#                        because resuming reads <run_dir>/checkpoints/last.ckpt.
# Which sam-train: $SAM_TRAIN if set, else the one on PATH, else the repository's .venv.

sam_train_srun() {
    local command=$1
    shift
    local repo bin
    repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
    bin=${SAM_TRAIN:-$(command -v sam-train || echo "$repo/.venv/bin/sam-train")}
    [[ -x $bin ]] || { echo "sam-train not found (tried PATH and $repo/.venv/bin); set SAM_TRAIN=" >&2; return 1; }
    : "${SLURM_JOB_ID:?run this with sbatch}"
    : "${SLURM_NTASKS_PER_NODE:?submit with --ntasks-per-node (one task per GPU); Lightning rejects --ntasks}"

    local defaults=("trainer.devices=$SLURM_NTASKS_PER_NODE" "trainer.num_nodes=$SLURM_NNODES")
    local arg has_run_dir=0
    for arg in "$@"; do [[ $arg == run_dir=* ]] && has_run_dir=1; done
    # ${name} is left for Hydra to interpolate (the recipe's name).
    [[ $has_run_dir == 1 ]] || defaults+=("run_dir=runs/\${name}/slurm-$SLURM_JOB_ID")

    echo "[slurm] job $SLURM_JOB_ID SLURM_RESTART_COUNT=${SLURM_RESTART_COUNT:-0}:" \
        "$SLURM_NNODES node(s) x $SLURM_NTASKS_PER_NODE task(s) on $SLURM_JOB_NODELIST: sam-train $command $*"
    # --kill-on-bad-exit: one failed rank ends the step instead of leaving the others hanging in a collective.
    srun --kill-on-bad-exit=1 "$bin" "$command" "${defaults[@]}" "$@"
}

