#!/usr/bin/env bash
# Runs qwen_jax.train on every host of a TPU VM slice (or of several slices).
#
#   launch/tpu_vm.sh NAME ZONE WORKDIR -- --gin_file=configs/models/qwen2_5_7b.gin --gin_file=...
#
# NAME is a TPU VM (single slice) or, with NUM_SLICES>1, the prefix of a queued resource whose
# slices are NAME-0 .. NAME-(N-1) (multi-slice over the data-center network: the mesh's `slice`
# axis). Every host runs the same command; jax.distributed discovers its peers from the TPU
# metadata, and each host reads only its own shard of the data. WORKDIR must be shared storage
# (gs://...) so that every host writes to the same checkpoint directory.
set -euo pipefail
if [[ $# -lt 4 || "$4" != "--" ]]; then
  echo "usage: $0 NAME ZONE WORKDIR -- [qwen_jax.train flags]" >&2
  exit 2
fi
name=$1 zone=$2 workdir=$3
shift 4
num_slices=${NUM_SLICES:-1}
repo=${REPO:-https://github.com/qwen-jax/qwen_jax.git}
ref=${REF:-main}

setup="set -e; if [ ! -d qwen_jax ]; then git clone -q $repo qwen_jax; fi; cd qwen_jax; \
git fetch -q origin $ref && git checkout -q FETCH_HEAD; python3 -m pip install -q -e '.[tpu]'"
train="cd qwen_jax && python3 -m qwen_jax.train --multihost --workdir=$workdir $(printf '%q ' "$@")"

run_on() {  # $1: TPU VM name
  gcloud compute tpus tpu-vm ssh "$1" --zone="$zone" --worker=all --command="$setup && $train"
}

if [[ $num_slices -eq 1 ]]; then
  run_on "$name"
else
  # Every slice starts together; the megascale runtime joins them over DCN.
  for ((i = 0; i < num_slices; i++)); do run_on "$name-$i" & done
  wait
fi
