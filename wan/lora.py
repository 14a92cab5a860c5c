"""LoRA: low-rank adapters on the transformer's linear layers, as a parameter-tree transform.

An adapter of a dense layer with kernel W (in, out) is two factors declared like every other
parameter: `lora_a` (in, r), random, and `lora_b` (r, out), zero, stacked over the blocks and
sharded by the same rule table as W (lora_a's input axis as W's, lora_b's output axis as W's).
Training differentiates the adapters only: `attach` puts them, with lora_b scaled by
alpha / rank, beside the frozen kernels, and `layers.dense` adds x @ lora_a @ lora_b to
x @ W, so no gradient of W is ever computed and the optimizer holds the adapters alone.

An adapter set is {"blocks": {"self_attn": {"q": {"lora_a", "lora_b"}, ...}, ...}} (the
transformer's tree, holding only the adapted layers). `load` reads one from any of the three
file formats (wan/weights/lora.py) with its scale folded into lora_b; `merge` adds
scale x lora_a @ lora_b into the kernels, giving the tree `transformer.load` gives.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from wan import params, transformer
from wan.errors import CheckpointError
from wan.params import Param
from wan.weights import lora as lora_weights

DEFAULT_TARGETS = "blocks/.*"


@dataclasses.dataclass(frozen=True)
class Settings:
  """The adapter a run trains: rank, alpha (scale alpha / rank) and the block modules."""
  rank: int
  alpha: float
  targets: tuple[str, ...]  # our module paths, "blocks/self_attn/q", ...

  @property
  def scale(self) -> float:
    return self.alpha / self.rank


@dataclasses.dataclass(frozen=True)
class Load:
  """One LoRA file to load: where, which file, its name (for messages), its scale and the rank
  the config expects of it (0: any)."""
  path: str
  weight_name: str
  name: str
  scale: float
  rank: int = 0

  def read(self) -> dict:
    """The file's adapter set (`load`), its rank checked against the expected one."""
    adapters = load(self.path, self.weight_name)
    found = max(np.shape(params.at(adapters, m)["lora_a"])[-1] for m in modules(adapters))
    if self.rank and found != self.rank:
      raise CheckpointError(f"LoRA {self.name or self.path} has rank {found}, but its "
                            f"lora_config.rank entry is {self.rank}; set it to {found}")
    return adapters


def candidates(cfg: transformer.Config) -> tuple[str, ...]:
  """Every linear layer of a block of `cfg` that an adapter can go on ("blocks/ffn/fc1", ...)."""
  block = transformer.declarations(cfg)["blocks"]
  out = []
  for module in lora_weights.MODULES:
    node = block
    for key in module.split("/"):
      node = node.get(key, {}) if isinstance(node, dict) else {}
    if "kernel" in node:
      out.append("blocks/" + module)
  return tuple(out)


def targets(cfg: transformer.Config, pattern: str) -> tuple[str, ...]:
  """The candidates whose path `pattern` (lora_targets, a regex) matches in full."""
  return params.matching(candidates(cfg), pattern, "lora_targets",
                         "the linear layers an adapter can go on")


def modules(adapters) -> list[str]:
  """The module paths of an adapter set ("blocks/self_attn/q", ...), in tree order."""
  found = []

  def walk(node, prefix):
    if "lora_a" in node:
      found.append(prefix)
      return
    for key, child in node.items():
      walk(child, f"{prefix}/{key}" if prefix else key)
  walk(adapters, "")
  return found


def declarations(cfg: transformer.Config, settings: Settings):
  """The adapters' declaration tree: lora_a like PyTorch's Linear init (PEFT's), lora_b zero."""
  block = transformer.declarations(cfg)["blocks"]
  decls = {}
  for path in settings.targets:
    kernel = params.at(block, path.removeprefix("blocks/"))["kernel"]
    layers_axis, in_axis, out_axis = kernel.axes
    n, n_in, n_out = kernel.shape
    decls = params.with_at(decls, path, {
        "lora_a": Param((n, n_in, settings.rank), (layers_axis, in_axis, None),
                        params.fan_in_uniform(2)),
        "lora_b": Param((n, settings.rank, n_out), (layers_axis, None, out_axis), params.zeros)})
  return decls


def init(cfg: transformer.Config, settings: Settings, key: jax.Array, dtype=jnp.float32):
  return params.init(declarations(cfg, settings), key, dtype)


def attach(base, adapters, scale: float = 1.0):
  """The transformer tree with each adapted dense layer holding lora_a and scale * lora_b (for
  `layers.dense`); differentiable in `adapters`, and `base` is not copied."""
  out = base
  for path in modules(adapters):
    ab = params.at(adapters, path)
    dense = dict(_dense_of(base, path), lora_a=ab["lora_a"], lora_b=ab["lora_b"] * scale)
    out = params.with_at(out, path, dense)
  return out


def _dense_of(params_, path: str) -> dict:
  """The dense layer at `path` of a transformer tree; CheckpointError when the model has none."""
  try:
    return params.at(params_, path)
  except (KeyError, TypeError):
    raise CheckpointError(f"LoRA adapts {path}, which this model does not have (a LoRA of "
                          "another model: an image-to-video LoRA on a text-to-video model?)"
                          ) from None


def _fit(path: str, a, b, shape):
  """The adapter's factors checked against a kernel of `shape` (L, in, out); fewer layers are
  padded with zeros."""
  n, n_in, n_out = shape
  if a.ndim != 3 or a.shape[1] != n_in or b.shape[2] != n_out:
    raise CheckpointError(f"LoRA {path} is {a.shape[1]} -> {b.shape[2]}, but the model's layer is "
                     f"{n_in} -> {n_out}: the LoRA was trained for another model")
  if a.shape[0] > n:
    raise CheckpointError(f"LoRA {path} has {a.shape[0]} blocks, the model {n}: the LoRA was "
                     "trained for another model")
  if a.shape[0] < n:
    pad = ((0, n - a.shape[0]), (0, 0), (0, 0))
    a, b = np.pad(np.asarray(a), pad), np.pad(np.asarray(b), pad)
  return a, b


def merge(params_, adapters, scale: float = 1.0):
  """`params_` with scale x lora_a @ lora_b added to each adapted kernel (computed in float32,
  stored in the kernel's dtype): the same tree and shapes as `transformer.load` gives.

  params_: the transformer's tree (host NumPy or jax arrays); adapters: an adapter set whose
  lora_b carries its alpha / rank (what `load` returns).
  """
  out = params_
  for path in modules(adapters):
    dense = _dense_of(params_, path)
    kernel = dense["kernel"]
    ab = params.at(adapters, path)
    a, b = _fit(path, ab["lora_a"], ab["lora_b"], kernel.shape)
    xp = np if isinstance(kernel, np.ndarray) else jnp
    delta = xp.einsum("lir,lro->lio", xp.asarray(a, np.float32), xp.asarray(b, np.float32))
    merged = (xp.asarray(kernel, np.float32) + scale * delta).astype(kernel.dtype)
    out = params.with_at(out, path, dict(dense, kernel=merged))
  return out


def load(path: str, weight_name: str = "") -> dict:
  """The adapter set of a LoRA file or directory in the diffusers, ComfyUI or musubi format,
  its alpha / rank folded into lora_b (float32 host arrays)."""
  flat = lora_weights.read(path, weight_name)
  out = {}
  for module, ab in flat.items():
    out = params.with_at(out, "blocks/" + module, ab)
  return out


def save(directory: str, adapters, alpha: float):
  """Writes an adapter set into `directory` in all three formats (see wan/weights/lora.py).

  adapters: host arrays with lora_b as trained (unscaled); alpha: the run's, written as the
  files' alpha (ComfyUI, musubi) or folded into lora_B (diffusers).
  """
  flat = {}
  for path in modules(adapters):
    ab = params.at(adapters, path)
    a = np.asarray(ab["lora_a"], np.float32)
    flat[path.removeprefix("blocks/")] = {
        "lora_a": a, "lora_b": np.asarray(ab["lora_b"], np.float32) * (alpha / a.shape[-1])}
  lora_weights.write(directory, flat, alpha)


def start(cfg: transformer.Config, settings: Settings, key: jax.Array, dtype=jnp.float32,
          loaded=None, scale: float = 1.0):
  """The trained adapter's first value: `init`, or a loaded adapter set (its change times
  `scale`) where it has modules, re-expressed for this run's alpha / rank (host arrays)."""
  adapters = jax.device_get(init(cfg, settings, key, dtype))
  if loaded is None:
    return adapters
  extra = sorted(set(modules(loaded)) - set(settings.targets))
  if extra:
    raise CheckpointError(f"the LoRA to continue adapts {', '.join(extra)}, which lora_targets "
                          f"does not train; widen lora_targets to include them")
  for path in modules(loaded):
    mine, theirs = params.at(adapters, path), params.at(loaded, path)
    shape = mine["lora_a"].shape[:2] + mine["lora_b"].shape[2:]
    a, b = _fit(path, np.asarray(theirs["lora_a"]), np.asarray(theirs["lora_b"]), shape)
    rank = a.shape[-1]
    if rank > settings.rank:
      raise CheckpointError(f"the LoRA to continue has rank {rank} at {path}, more than "
                            f"lora_config.rank={settings.rank}; set rank to {rank}")
    pad = ((0, 0), (0, 0), (0, settings.rank - rank))
    a = np.pad(a, pad)
    b = np.pad(b, ((0, 0), (0, settings.rank - rank), (0, 0))) * (scale / settings.scale)
    adapters = params.with_at(adapters, path, {"lora_a": a.astype(dtype),
                                               "lora_b": b.astype(dtype)})
  return adapters


def apply(params_, loads: tuple[Load, ...]):
  """`params_` with every LoRA of `loads` merged at its scale (the start of a run or a pipe)."""
  for item in loads:
    try:
      params_ = merge(params_, item.read(), item.scale)
    except CheckpointError as e:
      raise CheckpointError(f"LoRA {item.name or item.path}: {e}") from None
  return params_
