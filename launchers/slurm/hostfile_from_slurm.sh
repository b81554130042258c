#!/bin/bash
# Write a DeepSpeed/pdsh hostfile ("<host> slots=<G>" per node) for the nodes of the current
# SLURM allocation, from `scontrol show hostnames`.
#
#   launchers/slurm/hostfile_from_slurm.sh [SLOTS] > hostfile
#
# SLOTS (ranks per node): the argument, else RELBERT_DS_GPUS_PER_NODE, else the GPUs SLURM gave
# this node (SLURM_GPUS_ON_NODE), else SLURM_NTASKS_PER_NODE, else 1. Node list: SLURM_JOB_NODELIST
# (or SLURM_NODELIST). Used by train_deepspeed_per_node.sbatch (every node starts its own deepspeed
# launcher with --no_ssh --node_rank), or on the first node for `deepspeed --hostfile hostfile ...`
# where the nodes reach each other with password-less ssh (pdsh).
set -euo pipefail
nodelist=${SLURM_JOB_NODELIST:-${SLURM_NODELIST:-}}
if [ -z "$nodelist" ]; then
    echo "error: SLURM_JOB_NODELIST is not set (not inside a SLURM job); fix: run this inside sbatch/salloc" >&2
    exit 2
fi
slots=${1:-${RELBERT_DS_GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-}}}
if [ -z "$slots" ] || [ "$slots" = 0 ]; then
    slots=${SLURM_NTASKS_PER_NODE:-1}
    slots=${slots%%(*}   # "8(x2)" -> 8
fi
case $slots in (*[!0-9]*|'') echo "error: slots '$slots' is not a number; fix: pass the ranks per node" >&2; exit 2;; esac
scontrol show hostnames "$nodelist" | while read -r host; do
    [ -n "$host" ] && echo "$host slots=$slots"
done
