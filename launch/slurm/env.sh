# Job environment for training tasks under SLURM, sourced by the batch scripts here before `srun`. (The submitit
# preset, conf/hydra/launcher/submitit_slurm.yaml, has the same lines in its `setup`: keep the two alike.)
# srun hands this environment to every task; finetune.distributed maps SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID
# to RANK/WORLD_SIZE/LOCAL_RANK.

# Rendezvous: the first node of the allocation, and a port derived from the job id so that two jobs sharing a
# node do not collide. Always recomputed: a MASTER_* inherited from the submitting shell would be wrong here.
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_ADDR
export MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))

# Compute nodes often have no internet: W&B writes offline unless WANDB_MODE says otherwise (sync afterwards).
export WANDB_MODE=${WANDB_MODE:-offline}
# Size each task's thread pool to its own CPUs, not to the whole node.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}

# The project's virtual environment (VENV=/path/to/venv to use another; VENV=none to use what is on PATH).
VENV=${VENV:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)/.venv}
if [ "$VENV" != none ] && [ -f "$VENV/bin/activate" ]; then
    # shellcheck disable=SC1091
    source "$VENV/bin/activate"
fi
