# Job environment for training tasks under SLURM, sourced by the batch scripts here before `srun`. (The submitit
# preset, conf/hydra/launcher/submitit_slurm.yaml, has the same lines in its `setup`: keep the two alike.)
# srun hands this environment to every task; finetune.distributed maps SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID
# to RANK/WORLD_SIZE/LOCAL_RANK.

# The project's virtual environment (VENV=/path/to/venv to use another; VENV=none to use what is on PATH).
VENV=${VENV:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)/.venv}
if [ "$VENV" != none ] && [ -f "$VENV/bin/activate" ]; then
    # shellcheck disable=SC1091
    source "$VENV/bin/activate"
fi

# Rendezvous: the first node of the allocation, which is where this batch script runs, and a port that is free
# there now (the kernel picks it), so that two jobs sharing a node cannot collide on a port derived from their ids
# and no port is assumed free. Should another process take it before rank 0 listens, rank 0 fails at once and
# says so (finetune.distributed.RendezvousError). Always recomputed: a MASTER_* inherited from the submitting
# shell would be wrong here.
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_ADDR
MASTER_PORT=$(python3 -c 'import socket; s = socket.socket(); s.listen(); print(s.getsockname()[1])')
export MASTER_PORT

# Compute nodes often have no internet: W&B writes offline unless WANDB_MODE says otherwise (sync afterwards).
export WANDB_MODE=${WANDB_MODE:-offline}
# Size each task's thread pool to its own CPUs, not to the whole node.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}

# The run dir reaches Hydra through the environment (`hydra.run.dir=${oc.env:FINETUNE_RUN_DIR}`), never pasted
# into an override, where Hydra's grammar would read a comma as a sweep, choke on a quote, or interpolate `${`.
# Hydra itself interpolates its output dir again when it names its log file, so a `${` cannot be in it at all.
set_run_dir() {  # set_run_dir DIR: RUN_DIR and FINETUNE_RUN_DIR, absolute
    RUN_DIR=$(realpath -m "$1")
    case $RUN_DIR in
        *'${'*) echo "error: RUN_DIR=$RUN_DIR contains '\${', which Hydra reads as an interpolation:" \
                     "choose a run dir without it" >&2
                exit 2 ;;
    esac
    export RUN_DIR FINETUNE_RUN_DIR=$RUN_DIR
}
