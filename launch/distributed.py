"""Multi-host start-up: ``jax.distributed.initialize`` when (and only when) the job spans processes.

Decision order (``mode="auto"``):

1. explicit coordinates — ``--coordinator_address/--num_processes/--process_id`` flags or the
   ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID`` environment variables (what
   ``launch/gpu_cluster.sh`` exports; also used by the 2-process loopback test);
2. a SLURM job with more than one task (``SLURM_NTASKS`` > 1): JAX auto-detects from SLURM variables;
3. a multi-host Cloud TPU slice (``TPU_WORKER_HOSTNAMES`` lists more than one host, or
   ``MEGASCALE_COORDINATOR_ADDRESS`` is set): JAX auto-detects from the TPU metadata;
4. otherwise a single process: nothing to do.

``mode="on"`` forces auto-detection (``jax.distributed.initialize()`` with no arguments), ``"off"``
never initialises. Must run before any other JAX call.
"""

from __future__ import annotations

import os

from absl import logging

from input_pipeline.errors import UserError


def _env(name: str) -> str:
    return os.environ.get(name, "").strip()


def detect(environ=None) -> str:
    """``"explicit"``, ``"slurm"``, ``"tpu"`` or ``"single"`` for the current environment."""
    env = os.environ if environ is None else environ
    if env.get("JAX_COORDINATOR_ADDRESS"):
        return "explicit"
    try:
        if int(env.get("SLURM_NTASKS", "1") or 1) > 1:
            return "slurm"
    except ValueError:
        pass
    hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
    if len(hosts) > 1 or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return "tpu"
    return "single"


def initialize(mode: str = "auto", coordinator_address: str = "", num_processes: int = 0,
               process_id: int = -1, timeout_s: int = 300) -> bool:
    """Joins the distributed job if there is one; returns True when ``jax.distributed`` was initialised."""
    import jax  # noqa: PLC0415

    if mode not in ("auto", "on", "off"):
        raise UserError(f"--distributed must be auto, on or off, got {mode!r}", "--distributed")
    if mode == "off":
        return False
    address = coordinator_address or _env("JAX_COORDINATOR_ADDRESS")
    kind = "explicit" if address else detect()
    if mode == "auto" and kind == "single":
        return False
    if kind == "explicit":
        n = num_processes or int(_env("JAX_NUM_PROCESSES") or 0)
        pid = process_id if process_id >= 0 else int(_env("JAX_PROCESS_ID") or -1)
        if n <= 0 or pid < 0:
            raise UserError("a coordinator address needs the number of processes and this process's id "
                            "(--num_processes/--process_id or JAX_NUM_PROCESSES/JAX_PROCESS_ID)", address)
        logging.info("jax.distributed: process %d of %d, coordinator %s", pid, n, address)
        jax.distributed.initialize(coordinator_address=address, num_processes=n, process_id=pid,
                                   initialization_timeout=timeout_s)
    else:
        logging.info("jax.distributed: auto-detecting the cluster (%s)", kind)
        jax.distributed.initialize(initialization_timeout=timeout_s)
    logging.info("process %d of %d, %d local / %d global devices", jax.process_index(), jax.process_count(),
                 jax.local_device_count(), jax.device_count())
    return True
