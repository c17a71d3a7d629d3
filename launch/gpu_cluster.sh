#!/usr/bin/env bash
# Train on several GPU hosts: one process per host (each drives all of its local GPUs).
#
# SLURM (one task per node; jax.distributed auto-detects the job from the SLURM variables):
#
#   srun --nodes=4 --ntasks-per-node=1 --gpus-per-node=8 \
#     bash launch/gpu_cluster.sh --config=configs/liax.py:official --workdir=/shared/runs/liax
#
# Anything else (plain ssh, Kubernetes, a cloud batch service): start the same command on every host with
#
#   COORDINATOR=host0:12345 NUM_HOSTS=4 HOST_ID=<0..3> bash launch/gpu_cluster.sh --config=... --workdir=...
#
# which exports JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID for launch/distributed.py.
# The workdir must be on storage every host sees (checkpoints are written collectively; host 0 writes
# metrics and samples). Extra arguments go to launch/train.py unchanged.
#
# Environment: PORTRAIT_JAX_VENV (default .venv) is created on first use with jax[cuda13].
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${PORTRAIT_JAX_VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q -e . "jax[cuda13]"
fi
if [ -n "${COORDINATOR:-}" ]; then
  : "${NUM_HOSTS:?set NUM_HOSTS with COORDINATOR}" "${HOST_ID:?set HOST_ID with COORDINATOR}"
  export JAX_COORDINATOR_ADDRESS="$COORDINATOR" JAX_NUM_PROCESSES="$NUM_HOSTS" JAX_PROCESS_ID="$HOST_ID"
fi
# Let XLA overlap collectives with compute on NVIDIA GPUs.
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_latency_hiding_scheduler=true"
exec "$VENV/bin/python" launch/train.py "$@"
