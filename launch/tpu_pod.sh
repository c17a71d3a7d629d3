#!/usr/bin/env bash
# Train on a multi-host Cloud TPU VM slice: run the SAME command on every worker, e.g.
#
#   gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command="
#     cd portrait-jax && bash launch/tpu_pod.sh --config=configs/liax.py:base256 --workdir=/mnt/shared/runs/liax"
#
# Every worker joins the job through jax.distributed's TPU auto-detection (no coordinator flags), reads its
# own shard of the data, and takes part in the Orbax checkpoint saves; only worker 0 writes metrics and
# samples. The workdir must be a filesystem every worker shares (NFS/Filestore, or a bucket mounted with
# gcsfuse) so that every worker sees the same checkpoints. Extra arguments are passed to launch/train.py unchanged.
#
# Environment: PORTRAIT_JAX_VENV (default .venv) is created on first use with jax[tpu].
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${PORTRAIT_JAX_VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q -e . "jax[tpu]"
fi
exec "$VENV/bin/python" launch/train.py --distributed=on "$@"
