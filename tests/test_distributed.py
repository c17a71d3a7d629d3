"""launch/distributed.py: when a job joins jax.distributed (the 2-process run itself is in test_train.py)."""

import pytest

from input_pipeline.errors import UserError
from launch import distributed


@pytest.mark.parametrize("env,kind", [
    ({}, "single"),
    ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}, "explicit"),
    ({"SLURM_NTASKS": "1"}, "single"),
    ({"SLURM_NTASKS": "4"}, "slurm"),
    ({"TPU_WORKER_HOSTNAMES": "t1v-0"}, "single"),
    ({"TPU_WORKER_HOSTNAMES": "t1v-0,t1v-1,t1v-2,t1v-3"}, "tpu"),
    ({"MEGASCALE_COORDINATOR_ADDRESS": "10.0.0.2"}, "tpu"),
])
def test_detect(env, kind):
    assert distributed.detect(env) == kind


def test_single_process_does_nothing(monkeypatch):
    for name in ("JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.initialize("auto") is False
    assert distributed.initialize("off") is False


def test_coordinator_without_process_ids_is_a_user_error(monkeypatch):
    monkeypatch.delenv("JAX_NUM_PROCESSES", raising=False)
    monkeypatch.delenv("JAX_PROCESS_ID", raising=False)
    with pytest.raises(UserError, match="number of processes"):
        distributed.initialize("auto", coordinator_address="127.0.0.1:9")
    with pytest.raises(UserError, match="auto, on or off"):
        distributed.initialize("maybe")
