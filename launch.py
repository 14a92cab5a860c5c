"""Entry point: python launch.py --config=configs/wan22_t2v.py[:variant] [--config.field=value ...]

Reads an ml_collections config, joins the multi-host cluster when there is one, and trains.
"""

import os

from absl import app
from absl import logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Training config file, optionally with a variant: configs/x.py:tiny.",
    lock_config=True)


def _initialize_distributed(c):
  """Joins the cluster: explicit coordinator fields, or jax's auto-detection (TPU pods, SLURM,
  Open MPI) when the environment shows one; single-process runs skip it."""
  import jax
  if c.coordinator_address:
    if c.num_processes < 1 or c.process_id < 0:
      raise ValueError("coordinator_address needs num_processes >= 1 and process_id >= 0")
    jax.distributed.initialize(c.coordinator_address, c.num_processes, c.process_id)
  elif any(v in os.environ for v in ("TPU_WORKER_HOSTNAMES", "SLURM_NTASKS",
                                     "OMPI_COMM_WORLD_SIZE", "JAX_COORDINATOR_ADDRESS")):
    jax.distributed.initialize()


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}; settings go in --config.<field>")
  c = _CONFIG.value
  logging.set_verbosity(logging.WARNING)  # orbax logs every file operation at INFO
  if c.hardware == "cpu":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
  _initialize_distributed(c)
  from wan import train  # after distributed setup: importing jax backends comes later
  if c.jax_cache_dir:
    train.use_compilation_cache(c.jax_cache_dir)
  train.train(c)


if __name__ == "__main__":
  app.run(main)
