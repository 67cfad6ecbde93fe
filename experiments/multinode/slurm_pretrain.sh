#!/bin/bash
# DDPM pretraining on 2 nodes x 4 GPUs under SLURM, preemption-safe.
#
#   sbatch experiments/multinode/slurm_pretrain.sh            (from the project root)
#
# One SLURM task per node; each task runs `accelerate launch`, which starts that node's 4 GPU
# processes. If the job is preempted (partition with PreemptMode=REQUEUE) or approaches its
# time limit, it is requeued with the same job id and restarts from the newest checkpoint
# (train.resume=latest). See README.md in this folder.
#SBATCH --job-name=ddpm-pretrain
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=32
#SBATCH --mem=0
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@300
#SBATCH --output=logs/%x-%j.out
# (--requeue: allow requeueing; --signal: SIGUSR1 to this batch shell 300 s before the time
#  limit, so it can requeue itself instead of being killed; --open-mode=append: a requeued
#  job appends to its log instead of truncating it.)

set -euo pipefail
mkdir -p logs

CONFIG=${CONFIG:-configs/pretrain/isbi2015.yaml}
GPUS_PER_NODE=${GPUS_PER_NODE:-4}
PORT=${PORT:-29500}
# The job id survives a requeue, so a requeued job finds its own run folder and checkpoints.
RUN_NAME=${RUN_NAME:-pretrain_${SLURM_JOB_ID}}

# Rendezvous on the first node of the allocation.
MAIN_IP=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
NUM_PROCESSES=$((SLURM_NNODES * GPUS_PER_NODE))
export CONFIG PORT RUN_NAME MAIN_IP NUM_PROCESSES
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
# Compute nodes usually have no internet: W&B then logs offline under the run folder
# (logger.wandb_mode: auto); upload later with `wandb sync runs/$RUN_NAME/wandb/offline-run-*`.
# export NCCL_SOCKET_IFNAME=ib0     # pick the fast interface if NCCL chooses a wrong one

requeue() {
    echo "$(date) SIGUSR1: time limit near, requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
}
trap requeue USR1

echo "$(date) job $SLURM_JOB_ID (restart count ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST"

# Single quotes: $SLURM_NODEID must be expanded inside each task (0 on the first node, 1 ...).
# Run in the background and `wait`, so the batch shell can receive the USR1 trap meanwhile.
srun --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c '
  accelerate launch \
    --config_file experiments/multinode/accelerate_multinode.yaml \
    --num_machines "$SLURM_NNODES" \
    --num_processes "$NUM_PROCESSES" \
    --machine_rank "$SLURM_NODEID" \
    --main_process_ip "$MAIN_IP" \
    --main_process_port "$PORT" \
    -m ddpm_landmarks.pretrain --config "$CONFIG" \
    train.resume=latest run.name="$RUN_NAME"
' &
wait $!
