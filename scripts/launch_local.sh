#!/usr/bin/env bash
# Try a multi-host run on one machine: N `cifar-jax train` processes joined over 127.0.0.1, each with its own
# simulated CPU devices, all training one model together exactly as N hosts would.
#
#   scripts/launch_local.sh 2 --model model0 --epochs 2 --workdir checkpoints/two-hosts
#
# Process 0's output comes to this terminal; process i's goes to $LAUNCH_LOG_DIR/process-i.log (default: a new
# temporary folder, printed at the start). Ctrl-C stops all of them after a checkpoint. Exits with the first
# non-zero exit status among the processes, else 0.
#   CIFAR_JAX_LOCAL_DEVICES  simulated CPU devices per process (default 2)
#   PYTHON                   the interpreter that has cifar_jax installed (default: python)
set -euo pipefail

if [[ $# -lt 1 || ! "$1" =~ ^[1-9][0-9]*$ ]]; then
    echo "usage: $0 NUM_PROCESSES [cifar-jax train flags...]" >&2
    exit 2
fi
num_processes=$1
shift
python=${PYTHON:-python}
devices=${CIFAR_JAX_LOCAL_DEVICES:-2}
log_dir=${LAUNCH_LOG_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/cifar-jax-launch.XXXXXX")}
mkdir -p "$log_dir"
# A port that is free now; process 0 binds it for the coordinator a moment later.
port=$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')

export JAX_PLATFORMS=cpu
export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=$devices"
export CIFAR_JAX_COORDINATOR_ADDRESS="127.0.0.1:$port" CIFAR_JAX_NUM_PROCESSES="$num_processes"
echo "launching $num_processes processes x $devices CPU devices, coordinator 127.0.0.1:$port, logs of processes 1+ in $log_dir" >&2

pids=()
for ((id = num_processes - 1; id >= 0; id--)); do
    if ((id == 0)); then
        CIFAR_JAX_PROCESS_ID=0 "$python" -m cifar_jax train "$@" &
    else
        CIFAR_JAX_PROCESS_ID=$id "$python" -m cifar_jax train "$@" > "$log_dir/process-$id.log" 2>&1 &
    fi
    pids+=("$!")
done

# Ctrl-C or a TERM to this script reaches every process: they agree on a step, save a checkpoint and stop.
forward() { kill "-$1" "${pids[@]}" 2>/dev/null || true; }
trap 'forward INT' INT
trap 'forward TERM' TERM

status=0
for pid in "${pids[@]}"; do
    code=0
    wait "$pid" || code=$?
    while kill -0 "$pid" 2>/dev/null; do  # a forwarded signal interrupted the wait; the process still runs
        code=0
        wait "$pid" || code=$?
    done
    if ((status == 0 && code != 0)); then status=$code; fi
done
exit "$status"
