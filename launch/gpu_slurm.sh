#!/usr/bin/env bash
# Runs qwen_jax.train on a Slurm GPU cluster, one process per node owning all its GPUs.
#
#   sbatch --nodes=4 --gpus-per-node=8 launch/gpu_slurm.sh WORKDIR --gin_file=... [flags]
#
# DRY_RUN=1 prints the srun command instead of running it.
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
set -euo pipefail
if [[ $# -lt 1 ]]; then
  echo "usage: $0 WORKDIR [qwen_jax.train flags]" >&2
  exit 2
fi
workdir=$1
shift
# jax.distributed reads the coordinator, process count and index from Slurm's environment.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
# Overlap collectives with compute: the usual XLA GPU settings for FSDP training.
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_latency_hiding_scheduler=true"
command=(srun --kill-on-bad-exit=1 python3 -m qwen_jax.train --multihost --workdir="$workdir" "$@")
if [[ ${DRY_RUN:-0} == 1 ]]; then
  printf '%q ' "${command[@]}"
  printf '\n'
else
  "${command[@]}"
fi
