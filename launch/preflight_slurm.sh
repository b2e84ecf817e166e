#!/bin/bash
# Preflight every node of a Slurm allocation, then launch only on the fit ones:
#
#   sbatch --nodes 8 --gpus-per-node 8 launch/preflight_slurm.sh configs/llama2_70b.yaml
#   # -> preflight-<job>.out (the table), preflight-<job>.json, healthy_hosts-<job>.txt
#
# One task per node; each runs torchrun --standalone for its own GPUs, and the module does the
# cross-node rendezvous itself, so a node that never starts is named after --timeout instead of
# hanging torchrun. Node 0 prints the report and writes the files (put them on a shared path).
#SBATCH --job-name=megallm-preflight
#SBATCH --ntasks-per-node=1
#SBATCH --time=00:10:00
#SBATCH --output=preflight-%j.out
set -euo pipefail

CONFIG=${1:-configs/llama2_70b.yaml}
PYTHON=${PYTHON:-.venv/bin/python}
NPROC_PER_NODE=${NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
MASTER_PORT=${MASTER_PORT:-29511}
HOSTS=$(scontrol show hostnames "$SLURM_JOB_NODELIST")
MASTER_ADDR=$(echo "$HOSTS" | head -n 1)
EXPECTED=$(echo "$HOSTS" | paste -sd, -)

# --kill-on-bad-exit=0: a node that FAILs must not take the others down before node 0 reports.
# SLURM_NODEID is escaped so that each task reads its own.
srun --kill-on-bad-exit=0 bash -c "$PYTHON -m torch.distributed.run --standalone --nproc-per-node $NPROC_PER_NODE \
    -m megallm.preflight --nnodes $SLURM_NNODES --node-rank \$SLURM_NODEID \
    --master-addr $MASTER_ADDR --master-port $MASTER_PORT --expected-hosts $EXPECTED \
    --config $CONFIG --timeout 60 \
    --json-out preflight-$SLURM_JOB_ID.json --hosts-out healthy_hosts-$SLURM_JOB_ID.txt"
