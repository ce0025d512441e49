#!/usr/bin/env bash
# qwen_jax on Cloud TPU VMs: one slice, or several joined over the data-center network.
#
#   launch/tpu_vm.sh [-n] create NAME ZONE ACCELERATOR_TYPE   # e.g. v5p-256
#   launch/tpu_vm.sh [-n] setup  NAME ZONE ACCELERATOR_TYPE   # clone + pip install on every worker
#   launch/tpu_vm.sh [-n] train  NAME ZONE ACCELERATOR_TYPE WORKDIR -- [qwen_jax.train flags]
#   launch/tpu_vm.sh [-n] logs   NAME ZONE ACCELERATOR_TYPE   # follow worker 0's log
#   launch/tpu_vm.sh [-n] stop   NAME ZONE ACCELERATOR_TYPE   # delete the VMs
#
# -n (or DRY_RUN=1) prints every command instead of running it. `train` starts the same
# `python3 -m qwen_jax.train --multihost` on every worker of every slice (one ssh per worker,
# its output in qwen_jax/train.log there); jax.distributed finds its peers from the TPU
# metadata and each process reads its own data shards. WORKDIR must be storage every worker
# sees (gs://...). NUM_SLICES=N (default 1) makes NAME a queued resource of N slices, NAME-0 ..
# NAME-(N-1), joined by the megascale runtime (the mesh's `slice` axis). REPO and REF choose
# what `setup` installs; RUNTIME_VERSION the TPU software version `create` asks for.
set -euo pipefail

dry_run=${DRY_RUN:-0}
if [[ ${1:-} == "-n" ]]; then
  dry_run=1
  shift
fi

usage() {
  sed -n '3,8p' "$0" | sed 's/^# *//' >&2
  exit 2
}
[[ $# -ge 4 ]] || usage
command=$1 name=$2 zone=$3 accelerator=$4
shift 4
num_slices=${NUM_SLICES:-1}
repo=${REPO:-https://github.com/qwen-jax/qwen_jax.git}
ref=${REF:-main}
log=train.log  # in the worker's qwen_jax checkout

run() {
  if [[ $dry_run == 1 ]]; then
    printf '%q ' "$@"
    printf '\n'
  else
    "$@"
  fi
}

# Hosts in one slice: 2 TensorCores per chip on v4/v5p (the type counts cores), 1 on v5e/v6e
# (it counts chips); 4 chips per host on multi-host slices, up to 8 on a single v5e/v6e host.
workers() {
  local generation=${accelerator%%-*} size=${accelerator##*-} chips
  case $generation in
    v4 | v5p) chips=$((size / 2)) ;;
    v5e | v5litepod | v6e) chips=$size ;;
    *) echo "unknown accelerator type $accelerator" >&2; exit 2 ;;
  esac
  if ((chips <= 4)) || { [[ $generation != v4 && $generation != v5p ]] && ((chips <= 8)); }; then
    echo 1
  else
    echo $((chips / 4))
  fi
}

slices() {
  if ((num_slices == 1)); then
    echo "$name"
  else
    for ((s = 0; s < num_slices; s++)); do echo "$name-$s"; done
  fi
}

on_every_worker() {  # $1: the shell command each worker runs; all at once unless a dry run
  local slice worker count
  count=$(workers)
  for slice in $(slices); do
    for ((worker = 0; worker < count; worker++)); do
      if [[ $dry_run == 1 ]]; then
        run gcloud compute tpus tpu-vm ssh "$slice" --zone="$zone" --worker="$worker" \
          --command="$1"
      else
        run gcloud compute tpus tpu-vm ssh "$slice" --zone="$zone" --worker="$worker" \
          --command="$1" &
      fi
    done
  done
  wait
}

case $command in
  create)
    runtime=${RUNTIME_VERSION:-v2-alpha-tpuv5}
    if ((num_slices == 1)); then
      run gcloud compute tpus tpu-vm create "$name" --zone="$zone" \
        --accelerator-type="$accelerator" --version="$runtime"
    else
      run gcloud compute tpus queued-resources create "$name" --zone="$zone" \
        --accelerator-type="$accelerator" --runtime-version="$runtime" \
        --node-count="$num_slices" --node-prefix="$name"
    fi
    ;;
  setup)
    on_every_worker "set -e; [ -d qwen_jax ] || git clone -q $repo qwen_jax; cd qwen_jax; \
git fetch -q origin $ref && git checkout -q FETCH_HEAD; python3 -m pip install -q -e '.[tpu]'"
    ;;
  train)
    [[ $# -ge 2 && $2 == "--" ]] || usage
    workdir=$1
    shift 2
    flags=$(printf '%q ' "$@")
    on_every_worker "cd qwen_jax && python3 -m qwen_jax.train --multihost --workdir=$workdir \
$flags> $log 2>&1"
    ;;
  logs)
    run gcloud compute tpus tpu-vm ssh "$(slices | head -n 1)" --zone="$zone" --worker=0 \
      --command="tail -n +1 -f qwen_jax/$log"
    ;;
  stop)
    if ((num_slices == 1)); then
      run gcloud compute tpus tpu-vm delete "$name" --zone="$zone" --quiet
    else
      run gcloud compute tpus queued-resources delete "$name" --zone="$zone" --force --quiet
    fi
    ;;
  *) usage ;;
esac
