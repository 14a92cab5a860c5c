"""Entry point: python launch.py --config=configs/wan22_t2v.py[:variant] [--config.field=value ...]

Reads an ml_collections config, sets up the process (platform, multi-host cluster, compilation
cache), plans the run and runs its job: train, prepare (a data set into a cache of encoded
samples, wan/data/prepare.py), generate (videos from prompts, wan/generate.py) or export (a
run as a diffusers model root, wan/export.py). A config or input error is one message on stderr and exit status 2; `--verbose` shows its traceback.
"""

import difflib
import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from configs import base

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Training config file, optionally with a variant: configs/x.py:tiny.",
    lock_config=True)
_VERBOSE = flags.DEFINE_bool("verbose", False, "Show tracebacks of config and input errors.")

USAGE = "usage: python launch.py --config=configs/wan21_t2v.py:tiny [--config.<field>=<value> ...]"


def _fail(message: str):
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


def _field_message(name: str) -> str:
  """What to say about `--config.<name>` when the config has no such field."""
  top = name.split(".")[0]
  if top in base.MAXDIFFUSION_NAMES:
    ours, why = base.MAXDIFFUSION_NAMES[top]
    if ours:
      return f"`{top}` is called `{ours}` here: use --config.{ours}=..." + (f" ({why})" if why
                                                                            else "")
    return f"`{top}` (MaxDiffusion) has no counterpart here: {why}"
  defaults = base.get_config()
  if top in defaults and "." in name:
    sub = name.split(".", 1)[1]
    if not defaults[top].keys():  # an open dict (flash_block_sizes): set it whole
      return (f"`{top}` has no field `{sub}` to override; set the whole dict: "
              f"--config.{top}=\"{{'{sub}': ...}}\"")
    return f"`{top}` has no field `{sub}`; its fields are {', '.join(defaults[top].keys())}"
  fields = list(defaults.keys())
  close = difflib.get_close_matches(top, fields, n=3)
  hint = f"; did you mean {', '.join(close)}?" if close else "; see docs/config.md"
  return f"unknown config field `{name}`{hint}"


def _has_field(config, name: str) -> bool:
  for part in name.split("."):
    if not hasattr(config, "keys") or part not in config.keys():
      return False
    config = config[part]
  return True


def _parse_flags(argv):
  """absl's flag parsing, with one clear line for a field, file or value that does not work."""
  if not any(a == "--config" or a.startswith("--config=") for a in argv[1:]):
    _fail(f"--config is required\n{USAGE}")
  try:
    return flags.FLAGS(argv)
  except (flags.Error, AttributeError, KeyError) as e:
    if "--verbose" in argv:
      raise
    text = str(e)
    if isinstance(e, (AttributeError, KeyError)):  # a --config.<name> the config lacks
      defaults = base.get_config()
      given = [a[len("--config."):].split("=")[0] for a in argv if a.startswith("--config.")]
      missing = [g for g in given if not _has_field(defaults, g)]
      _fail(_field_message(missing[0]) if missing else text)
    if "Error whilst parsing config file" in text:  # the config's own error, last line of it
      text = text.strip().splitlines()[-1]
    _fail(text.strip().splitlines()[0] if "\n" in text.strip() else text)


def _set_platform(c):
  """hardware=cpu forces the CPU backend (before any jax backend starts)."""
  if c.hardware == "cpu":
    import jax
    jax.config.update("jax_platforms", "cpu")


def _initialize_distributed(c):
  """Joins the cluster: explicit coordinator fields, or jax's auto-detection (TPU pods, SLURM,
  Open MPI) when the environment shows one; single-process runs skip it."""
  import jax
  if c.coordinator_address:
    jax.distributed.initialize(c.coordinator_address, c.num_processes, c.process_id)
  elif any(v in os.environ for v in ("TPU_WORKER_HOSTNAMES", "SLURM_NTASKS",
                                     "OMPI_COMM_WORLD_SIZE", "JAX_COORDINATOR_ADDRESS")):
    jax.distributed.initialize()


def use_compilation_cache(path: str):
  """Caches every compiled program under `path` for later processes ("": jax's own setting,
  off unless JAX_COMPILATION_CACHE_DIR is set)."""
  if not path:
    return
  import jax
  from jax.experimental.compilation_cache import compilation_cache
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  compilation_cache.reset_cache()  # the next compilation opens the cache at the new path


def run(c):
  """Plans and runs the job of config `c` in this process."""
  from wan import plan as plan_lib
  plan_lib.check(c)  # before joining a cluster: a typo costs no accelerator time
  _set_platform(c)
  _initialize_distributed(c)
  import jax
  if c.job == "prepare":
    from wan.data import prepare
    prep = plan_lib.preparation(c)
    if jax.process_index() == 0:
      print(prep.summary(), flush=True)
    prepare.run(prep)
    return
  if c.job == "generate":
    from wan import generate
    gen = plan_lib.generation(c, plan_lib.Devices.of(jax.devices()))
    use_compilation_cache(gen.jax_cache_dir)
    if jax.process_index() == 0:
      print(gen.summary(), flush=True)
    generate.run(gen)
    return
  if c.job == "export":
    from wan import export
    exp = plan_lib.export(c, plan_lib.Devices.of(jax.devices()))
    if jax.process_index() == 0:
      print(exp.summary(), flush=True)
    export.run(exp)
    return
  from wan import train
  plan = plan_lib.make(c, plan_lib.Devices.of(jax.devices()))
  use_compilation_cache(plan.outputs.jax_cache_dir)
  if jax.process_index() == 0:
    print(plan.summary(), flush=True)
  train.train(plan)


def main(argv):
  if len(argv) > 1:
    _fail(f"unexpected arguments {argv[1:]}; settings go in --config.<field>=<value>\n{USAGE}")
  c = _CONFIG.value
  try:
    c.keys()  # a config file that cannot be loaded is an error object until used
  except Exception as e:  # pylint: disable=broad-except
    _fail(f"--config={flags.FLAGS['config'].config_filename}: "
          f"{str(e).strip().splitlines()[-1].strip()}")
  logging.set_verbosity(logging.WARNING)  # orbax logs every file operation at INFO
  if not _VERBOSE.value:
    # orbax also logs each failure of its background threads with a traceback per thread; the
    # failure reaches the run as an exception, which is reported once (--verbose keeps both).
    logging.get_absl_handler().addFilter(
        lambda record: not (record.levelno >= logging.ERROR and "/orbax/" in record.pathname))
  from wan.errors import UserError
  try:
    run(c)
  except UserError as e:
    if _VERBOSE.value:
      raise
    _fail(str(e))


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
