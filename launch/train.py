r"""Training entry point for every model.

    python launch/train.py --config=configs/liax.py:tiny --workdir=runs/tiny [--config.key=value ...]

Runs, or resumes from the newest checkpoint in ``--workdir``, the job the config describes (model, data,
mesh, optimizer, loss weights, eval and checkpoint cadence): see :mod:`launch.trainer`. SIGTERM saves a
checkpoint and exits cleanly; rerunning the same command continues where it stopped.

Multi-host: ``jax.distributed`` is initialised automatically on multi-host TPU slices and multi-task SLURM
jobs, or from ``--coordinator_address/--num_processes/--process_id`` (or the ``JAX_COORDINATOR_ADDRESS``,
``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID`` variables); see ``launch/tpu_pod.sh`` and ``launch/gpu_cluster.sh``.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from launch import cli  # noqa: E402

config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/liax.py:tiny.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics, samples (resumes from it).", required=True)
flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"],
                  "jax.distributed.initialize: auto-detect a multi-process job, force it, or never.")
flags.DEFINE_string("coordinator_address", "", "host:port of process 0 (multi-process jobs without auto-detection).")
flags.DEFINE_integer("num_processes", 0, "Number of processes (with --coordinator_address).")
flags.DEFINE_integer("process_id", -1, "This process's index (with --coordinator_address).")
flags.DEFINE_string("compilation_cache", os.path.join("~", ".cache", "portrait_jax", "xla"),
                    "Persistent XLA compilation cache folder (restarts and resumes skip recompiling); '' disables.")


def main(argv):
    del argv
    from input_pipeline.errors import UserError  # noqa: PLC0415
    from launch import distributed  # noqa: PLC0415

    FLAGS = flags.FLAGS
    cli.quiet_library_logs()
    if FLAGS.config is None:
        raise UserError("missing --config (e.g. --config=configs/liax.py:tiny)")
    distributed.initialize(FLAGS.distributed, FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)

    import jax  # noqa: PLC0415

    from launch import trainer  # noqa: PLC0415

    if FLAGS.compilation_cache and not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser(FLAGS.compilation_cache))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)

    if jax.process_index() != 0:
        logging.set_verbosity(logging.WARNING)
    summary = trainer.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    if jax.process_index() == 0:
        print(json.dumps(summary))


if __name__ == "__main__":
    cli.run(main)
