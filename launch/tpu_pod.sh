#!/usr/bin/env bash
# maxtrain on a Cloud TPU VM pod slice: the same command on every worker.
#
#   launch/tpu_pod.sh TPU_NAME ZONE CONFIG.yaml [key=value ...]
#   launch/tpu_pod.sh my-v5p-64 us-east5-a configs/base.yaml model=llama3.1-8b mesh.fsdp=-1 run_dir=gs://bucket/run
#
# Needs gcloud, and maxtrain installed on every worker in MAXTRAIN_DIR (default ~/maxtrain);
# set MAXTRAIN_SETUP to a command run on each worker first (e.g. "git -C ~/maxtrain pull").
# On the workers jax.distributed reads the TPU metadata (coordinator = worker 0, process id =
# worker number); distributed.cluster=tpu asks for exactly that. A rerun resumes from the
# latest checkpoint in run_dir, which must be shared storage (a gs:// bucket or a filestore).
set -euo pipefail

if [[ $# -lt 3 ]]; then
  echo "usage: launch/tpu_pod.sh TPU_NAME ZONE CONFIG.yaml [key=value ...]" >&2
  exit 2
fi
tpu=$1 zone=$2
shift 2
dir=${MAXTRAIN_DIR:-'~/maxtrain'}
python=${MAXTRAIN_PYTHON:-python3}
args=$(printf '%q ' "$@")
setup=${MAXTRAIN_SETUP:-true}

gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=all --command \
  "set -e; $setup; cd $dir && PYTHONUNBUFFERED=1 $python -m maxtrain.cli train $args distributed.cluster=tpu"
