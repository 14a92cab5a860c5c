"""Parameter declarations.

Every parameter of every model is declared once, as a `Param` leaf in a nested dict: its shape,
its logical axis names and its initializer. Initial values, abstract shapes and shardings are all
derived from that one declaration tree, so no second tree of shapes or PartitionSpecs is ever
written by hand.
"""

import dataclasses
import math
import re
from typing import Callable

import jax
import jax.numpy as jnp

from wan import sharding

Initializer = Callable[[jax.Array, tuple, jnp.dtype], jax.Array]


def zeros(key, shape, dtype):
  del key
  return jnp.zeros(shape, dtype)


def ones(key, shape, dtype):
  del key
  return jnp.ones(shape, dtype)


def normal(std: float) -> Initializer:
  def init(key, shape, dtype):
    return (std * jax.random.normal(key, shape, jnp.float32)).astype(dtype)
  return init


def fan_in_uniform(fan_in_dims: int = 1) -> Initializer:
  """PyTorch's default for Linear/Conv weights: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).

  `fan_in_dims` counts the leading dimensions that feed each output (1 for a (in, out) matrix,
  4 for a (kt, kh, kw, in, out) conv kernel).
  """
  def init(key, shape, dtype):
    bound = 1.0 / math.sqrt(math.prod(shape[:fan_in_dims]))
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound).astype(dtype)
  return init


@dataclasses.dataclass(frozen=True)
class Param:
  """One parameter: shape, one logical axis name (or None) per dimension, initializer.

  `dtype` pins a parameter's storage type (e.g. float32 norm scales); None means the model's
  weights dtype.
  """
  shape: tuple[int, ...]
  axes: tuple[str | None, ...]
  init: Initializer = fan_in_uniform()
  dtype: jnp.dtype | None = None

  def __post_init__(self):
    if len(self.shape) != len(self.axes):
      raise ValueError(f"Param shape {self.shape} and axes {self.axes} differ in rank")


def is_param(x) -> bool:
  return isinstance(x, Param)


def _map(fn, decls):
  return jax.tree.map(fn, decls, is_leaf=is_param)


def stack(decls, n: int, axis: str = "layers"):
  """Declarations for `n` copies of `decls` stacked on a new leading axis (for `lax.scan`)."""
  def stacked(p: Param) -> Param:
    def init(key, shape, dtype):
      return jax.vmap(lambda k: p.init(k, shape[1:], dtype))(jax.random.split(key, shape[0]))
    return Param((n,) + p.shape, (axis,) + p.axes, init, p.dtype)
  return _map(stacked, decls)


def init(decls, key: jax.Array, dtype=jnp.float32):
  """Initial parameter values; each leaf gets its own key derived from its path."""
  leaves, treedef = jax.tree.flatten_with_path(decls, is_leaf=is_param)
  values = []
  for path, p in leaves:
    leaf_key = jax.random.fold_in(key, _path_hash(path))
    values.append(p.init(leaf_key, p.shape, p.dtype or dtype))
  return jax.tree.unflatten(treedef, values)


def _path_hash(path) -> int:
  # Stable across runs and Python processes (unlike hash()): adding a parameter elsewhere in the
  # tree does not change the initial value of this one.
  text = jax.tree_util.keystr(path)
  h = 0
  for ch in text.encode():
    h = (h * 131 + ch) % (2**31 - 1)
  return h


def abstract(decls, dtype=jnp.float32):
  """`jax.ShapeDtypeStruct` tree of the parameters (no memory allocated)."""
  return _map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype or dtype), decls)


def partition_specs(decls, mesh, rules=sharding.RULES):
  """`PartitionSpec` tree from the logical axes (see `sharding.param_spec`)."""
  return _map(lambda p: sharding.param_spec(p.axes, p.shape, mesh, rules)[0], decls)


def shardings(decls, mesh: jax.sharding.Mesh, rules=sharding.RULES):
  """`NamedSharding` tree for placing parameters (and optimizer state shaped like them)."""
  return _map(lambda p: jax.NamedSharding(mesh, sharding.param_spec(p.axes, p.shape, mesh,
                                                                    rules)[0]), decls)


@dataclasses.dataclass(frozen=True)
class Placement:
  """Where one parameter goes on a mesh."""
  path: str
  shape: tuple[int, ...]
  nbytes: int
  spec: jax.P
  unplaced: tuple[str, ...]  # mesh axes its logical axes ask for that no dimension could take

  def per_device_bytes(self, mesh) -> float:
    sizes = sharding.axis_sizes(mesh)
    axes = [a for e in self.spec if e for a in ((e,) if isinstance(e, str) else e)]
    return self.nbytes / math.prod(sizes[a] for a in axes)


def placements(decls, mesh, dtype=jnp.float32, rules=sharding.RULES) -> list[Placement]:
  """How `shardings` places every parameter. `mesh`: a Mesh or {axis: size}; no devices needed."""
  out = []
  for path, p in jax.tree.flatten_with_path(decls, is_leaf=is_param)[0]:
    spec, unplaced = sharding.param_spec(p.axes, p.shape, mesh, rules)
    out.append(Placement(jax.tree_util.keystr(path, simple=True, separator="/"), p.shape,
                         _nbytes(p, dtype), spec, unplaced))
  return out


def _nbytes(p: Param, dtype) -> int:
  return math.prod(p.shape) * jnp.dtype(p.dtype or dtype).itemsize


def nbytes(decls, dtype=jnp.float32) -> int:
  """Bytes of all parameters (pinned dtypes as declared, the rest in `dtype`)."""
  return sum(_nbytes(p, dtype) for p in jax.tree.leaves(decls, is_leaf=is_param))


def count(decls) -> int:
  """Number of scalar parameters."""
  return sum(math.prod(p.shape) for p in jax.tree.leaves(decls, is_leaf=is_param))


def matching(paths, pattern: str, field: str, what: str) -> tuple[str, ...]:
  """The `paths` that regex `pattern` (config field `field`) matches in full; ValueError naming
  the field when it is not a regex or matches none of them (`what` they are)."""
  try:
    regex = re.compile(pattern)
  except re.error as e:
    raise ValueError(f"{field}={pattern!r} is not a regular expression ({e})") from None
  found = tuple(p for p in paths if regex.fullmatch(p))
  if not found:
    raise ValueError(f"{field}={pattern!r} matches none of {what}: {', '.join(paths)}")
  return found


def paths(decls) -> list[tuple[str, "Param"]]:
  """[(path "a/b/0/c", Param)] of a declaration tree, in tree order."""
  flat, _ = jax.tree.flatten_with_path(decls, is_leaf=is_param)
  return [("/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path), p)
          for path, p in flat]


def at(tree, path: str):
  """The node of a nested dict at "a/b/c"."""
  for key in path.split("/"):
    tree = tree[key]
  return tree


def with_at(tree: dict, path: str, value):
  """A copy of nested dict `tree` with the node at "a/b/c" set to `value` (the rest shared,
  missing levels created)."""
  key, _, rest = path.partition("/")
  out = dict(tree)
  out[key] = with_at(tree.get(key, {}), rest, value) if rest else value
  return out
