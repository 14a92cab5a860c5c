"""The experts a run holds (Wan 2.2 A14B: high_noise and low_noise, or both in one run), and the
per-expert conventions that training, generation and export share."""

import dataclasses

import jax

from wan import fs, lora, transformer
from wan.errors import CheckpointError

EXPERTS = ("high_noise", "low_noise")


def held(expert: str) -> tuple[str, ...]:
  """The experts a run of `expert` ("high_noise", "low_noise" or "both") trains."""
  return EXPERTS if expert == "both" else (expert,)


def init_key(seed: int, run_expert: str, expert: str) -> jax.Array:
  """The key of `expert`'s random initialisation in a run of `run_expert` (weights from no
  checkpoint): the trained expert's is key(seed), so a one-expert run's is the same whichever it
  trains; the other's (both, or the untrained one a pipeline needs) is folded from it."""
  key = jax.random.key(seed)
  first = "high_noise" if run_expert == "both" else run_expert
  return key if expert == first else jax.random.fold_in(key, 1)


def lora_loads(loads, run_expert: str, expert: str) -> tuple:
  """The LoRA files of `expert`: as given, or, in an expert=both run, each path's <expert>/
  folder (where an expert=both run writes its LoRA files)."""
  if run_expert != "both":
    return tuple(loads)
  return tuple(dataclasses.replace(x, path=fs.join(x.path, expert)) for x in loads)


def pretrained(model: transformer.Config, weights: str, dtype, expert: str, key, loads=(),
               mesh=None):
  """One expert's transformer as a job starts it: read from `weights` (with a `mesh`, each
  process reads only the parts its devices hold, and the result is placed by the rule table;
  without one, on the host) or, without weights, initialised from `key`; then the LoRA files
  `loads` (lora.Load) merged in."""
  shardings = None if mesh is None else transformer.shardings(model, mesh)
  if weights:
    cfg, p = transformer.load(weights, dtype, expert=expert, mesh=mesh)
    if cfg != model:  # the plan read the same checkpoint's config.json
      raise CheckpointError(f"{weights} changed while the job started: its architecture is now "
                            f"{cfg}, the plan's {model}")
  elif mesh is None:
    p = jax.device_get(transformer.init(model, key, dtype))
  else:
    p = jax.jit(lambda k: transformer.init(model, k, dtype), out_shardings=shardings)(key)
  if not loads:
    return p
  p = lora.apply(p, loads)
  return p if mesh is None else jax.device_put(p, shardings)
