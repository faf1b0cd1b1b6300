#!/usr/bin/env bash
# Start NPROC maxtrain processes on this machine (CPU, coordinator on localhost).
#
#   launch/local.sh NPROC [maxtrain train arguments...]
#   launch/local.sh 2 configs/base.yaml steps=100 run_dir=runs/two
#
# Every process gets MAXTRAIN_COORDINATOR / MAXTRAIN_NUM_PROCESSES / MAXTRAIN_PROCESS_ID;
# maxtrain joins them with jax.distributed (gloo collectives on CPU). Process 0 prints its
# log here; the others print warnings and errors only, prefixed with [i].
# Exit status: 0 when every process succeeded, else the first failure's code; when one
# process fails the others are stopped (after MAXTRAIN_GRACE_S seconds, default 30, to let
# them report).
#
# Environment: MAXTRAIN_PYTHON (default: python3), MAXTRAIN_PORT (default: a free port),
# MAXTRAIN_LOCAL_DEVICES (fake CPU devices per process, default 1), MAXTRAIN_COMMAND
# (default: train; e.g. "eval").
set -uo pipefail

if [[ $# -lt 1 || ! "$1" =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: launch/local.sh NPROC [maxtrain train arguments...]" >&2
  exit 2
fi
nproc=$1
shift
python=${MAXTRAIN_PYTHON:-python3}
port=${MAXTRAIN_PORT:-$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
devices=${MAXTRAIN_LOCAL_DEVICES:-1}
grace=${MAXTRAIN_GRACE_S:-30}
command=${MAXTRAIN_COMMAND:-train}

flags=""
for f in ${XLA_FLAGS:-}; do  # keep the caller's XLA flags, replace the device count
  [[ $f == --xla_force_host_platform_device_count=* ]] || flags+="$f "
done
export XLA_FLAGS="${flags}--xla_force_host_platform_device_count=$devices"
export JAX_PLATFORMS=cpu PYTHONUNBUFFERED=1
export MAXTRAIN_COORDINATOR="127.0.0.1:$port" MAXTRAIN_NUM_PROCESSES=$nproc

pids=()
for ((i = 0; i < nproc; i++)); do
  if ((i == 0)); then
    MAXTRAIN_PROCESS_ID=$i "$python" -m maxtrain.cli "$command" "$@" &
  else
    MAXTRAIN_PROCESS_ID=$i "$python" -m maxtrain.cli "$command" "$@" > >(sed -u "s/^/[$i] /") 2> >(sed -u "s/^/[$i] /" >&2) &
  fi
  pids+=($!)
done

stop_all() {
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null; done
}
trap 'stop_all; exit 130' INT TERM

status=0
running=("${pids[@]}")
while ((${#running[@]} > 0)); do
  wait -n -p done_pid "${running[@]}"
  code=$?
  still=()
  for pid in "${running[@]}"; do [[ $pid == "$done_pid" ]] || still+=("$pid"); done
  running=("${still[@]}")
  if ((code != 0 && status == 0)); then
    for ((i = 0; i < nproc; i++)); do [[ ${pids[$i]} == "$done_pid" ]] && who=$i; done
    echo "launch/local.sh: process ${who:-?} exited with code $code; stopping the others within ${grace}s" >&2
    status=$code
    ( sleep "$grace"; for pid in "${pids[@]}"; do kill -KILL "$pid" 2>/dev/null; done ) &
    killer=$!
  fi
done
[[ -n ${killer:-} ]] && kill "$killer" 2>/dev/null
exit $status
