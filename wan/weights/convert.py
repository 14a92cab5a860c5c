"""The one converter between checkpoint tensors and our parameter trees, and its one checker.

A model's name map says, for each of our parameter paths ("blocks/self_attn/q/kernel"), which
checkpoint tensor holds it and how its layout differs (`Tensor`). A parameter whose declaration
is stacked on a leading "layers" axis is one tensor per layer: its name is a template with a
`{layer}` field. Converting checks every tensor before building anything and reports every
missing, mis-shaped and unexpected tensor together, in one `CheckpointError` naming the source.
"""

import dataclasses
import math
import re

import jax
import numpy as np

from wan.errors import CheckpointError
from wan import params
from wan.params import is_param

_SHOWN = 30  # problems listed in one error; the rest are counted


@dataclasses.dataclass(frozen=True)
class Layout:
  """How one checkpoint tensor of `shape` becomes ours: transpose(theirs, perm).reshape(ours).

  perm None is no transpose: `Layout(shape)` alone is a tensor stored as ours, or with other
  axes of the same values ((1, n, D) modulation tables, (C, 1, 1, 1) gammas, (D,) biases of
  our (H, hd)). `linear` and `conv` build the PyTorch Linear and Conv layouts.
  """
  shape: tuple[int, ...]
  perm: tuple[int, ...] | None = None

  def to_ours(self, t: np.ndarray, our_shape: tuple[int, ...]) -> np.ndarray:
    t = np.asarray(t)
    return (t if self.perm is None else t.transpose(self.perm)).reshape(our_shape)

  def to_theirs(self, a: np.ndarray) -> np.ndarray:
    a = np.asarray(a)
    if self.perm is None:
      return a.reshape(self.shape)
    permuted = tuple(self.shape[p] for p in self.perm)
    return a.reshape(permuted).transpose(np.argsort(self.perm))


def linear(our_shape, in_dims: int = 1) -> Layout:
  """A PyTorch Linear weight (out, in) of our kernel (*in, *out); `in_dims` leading axes are in.

  UMT5's q (D, H, K) is (H*K, D) in PyTorch, its o (H, K, D) (in_dims=2) is (D, H*K).
  """
  n_in, n_out = math.prod(our_shape[:in_dims]), math.prod(our_shape[in_dims:])
  return Layout((n_out, n_in), (1, 0))


def conv(our_shape, torch_kernel=None) -> Layout:
  """A PyTorch Conv weight (O, I, *k) of our kernel (*k, I, O).

  `torch_kernel` is the PyTorch kernel size when it differs from ours: a 1x1 Conv2d used as our
  dense (I, O) kernel has torch_kernel (1, 1).
  """
  cin, cout = our_shape[-2:]
  kernel = tuple(our_shape[:-2]) if torch_kernel is None else tuple(torch_kernel)
  n = len(kernel)
  return Layout((cout, cin, *kernel), (*range(2, n + 2), 1, 0))


@dataclasses.dataclass(frozen=True)
class Tensor:
  """Where one of our parameters is in a checkpoint: its name (`{layer}` in it when stacked)
  and the layout of one tensor."""
  name: str
  layout: Layout


leaves = params.paths  # [(path "a/b/0/c", Param)] of a declaration tree, in tree order


def _lookup(table: dict[str, str], path: str, leaf_names: dict[str, str]) -> tuple[str, str | None]:
  """(checkpoint name, our leaf name) of `path` by a table {our module path: their name}.

  A path in the table is a bare parameter named as the table says (leaf None); otherwise its
  module is in the table and the leaf's name (kernel -> weight, ...) is appended.
  """
  if path in table:
    return table[path], None
  module, leaf = path.rsplit("/", 1)
  return f"{table[module]}.{leaf_names[leaf]}", leaf


def names_by_tables(decls, top: dict, stacked: dict, leaf_names: dict, layout,
                    stack: str = "layers") -> dict[str, Tensor]:
  """{our path: Tensor} of a model made of top-level modules and one stack of layers.

  top, stacked: {our module path: checkpoint name}, for paths outside and inside `stack`/ (the
  stacked names hold `{layer}`). leaf_names: our leaf -> theirs ("kernel" -> "weight").
  layout(path, leaf, shape) -> Layout, with the path inside the stack and one layer's shape.
  """
  out = {}
  for path, p in leaves(decls):
    in_stack = path.startswith(stack + "/")
    sub = path[len(stack) + 1:] if in_stack else path
    name, leaf = _lookup(stacked if in_stack else top, sub, leaf_names)
    out[path] = Tensor(name, layout(sub, leaf, tuple(p.shape[1:] if in_stack else p.shape)))
  return out


def _stacked(param) -> bool:
  return bool(param.axes) and param.axes[0] == "layers"


def _names(entry: Tensor, param) -> list[str]:
  if _stacked(param):
    return [entry.name.format(layer=i) for i in range(param.shape[0])]
  return [entry.name]


def _unit_shape(param) -> tuple[int, ...]:
  return tuple(param.shape[1:] if _stacked(param) else param.shape)


def _report(source: str, what: str, problems: list[str]):
  more = f"\n  ... and {len(problems) - _SHOWN} more" if len(problems) > _SHOWN else ""
  raise CheckpointError(f"{source} does not match the {what} declarations ({len(problems)} "
                        "problem(s)):\n  " + "\n  ".join(problems[:_SHOWN]) + more)


def check(tensors: dict, decls, name_map: dict[str, Tensor], *, source: str, what: str,
          ignore: tuple[str, ...] = ()):
  """Raises one CheckpointError listing every missing, mis-shaped and unexpected tensor.

  tensors: name -> anything with `.shape` (arrays or header entries). ignore: regular
  expressions (re.match) of checkpoint names that may be present and are not used.
  """
  missing, misshaped, used = [], [], set()
  for path, param in leaves(decls):
    entry = name_map[path]
    want = entry.layout.shape
    for name in _names(entry, param):
      used.add(name)
      if name not in tensors:
        missing.append(f"missing tensor {name} (expected shape {want})")
      elif tuple(tensors[name].shape) != want:
        misshaped.append(f"tensor {name} has shape {tuple(tensors[name].shape)}, expected {want}")
  patterns = [re.compile(p) for p in ignore]
  unexpected = [f"unexpected tensor {n} (not part of this model)"
                for n in sorted(set(tensors) - used) if not any(p.match(n) for p in patterns)]
  problems = missing + misshaped + unexpected
  if problems:
    _report(source, what, problems)


def to_params(tensors: dict, decls, name_map: dict[str, Tensor], dtype, *, source: str,
              what: str, ignore: tuple[str, ...] = (), shardings=None):
  """Our parameter tree from checkpoint tensors, after `check`: host NumPy arrays, or with
  `shardings` (a NamedSharding tree like `decls`) jax Arrays placed by them.

  Each leaf is in its declaration's pinned dtype, else `dtype`; stacked leaves are
  (layers, ...) arrays built from one tensor per layer. Placed, each process converts only the
  parts of each tensor that its own devices hold (`_placed`).
  """
  check(tensors, decls, name_map, source=source, what=what, ignore=ignore)
  treedef = jax.tree.structure(decls, is_leaf=is_param)
  placements = [None] * treedef.num_leaves if shardings is None else treedef.flatten_up_to(
      shardings)
  values = []
  for (path, param), sharding in zip(leaves(decls), placements):
    entry, shape = name_map[path], _unit_shape(param)
    leaf_dtype = np.dtype(param.dtype or dtype)
    layers = [tensors[n] for n in _names(entry, param)]
    if sharding is not None:
      values.append(_placed(layers, entry.layout, shape, _stacked(param), leaf_dtype,
                            tuple(param.shape), sharding))
      continue
    layers = [entry.layout.to_ours(t, shape).astype(leaf_dtype) for t in layers]
    values.append(np.stack(layers) if _stacked(param) else layers[0])
  return jax.tree.unflatten(treedef, values)


def _placed(layers: list, layout: Layout, unit: tuple, stacked: bool, dtype, shape: tuple,
            sharding) -> jax.Array:
  """One leaf as a jax Array placed by `sharding`, built from this process's shards only.

  Each checkpoint tensor (one per layer when stacked) is viewed in our layout (memory-mapped
  files are not read by the view; a bucket tensor is read once) and only the slices that this
  process's devices hold are copied, in `dtype`, into one buffer per distinct shard: the host
  holds this process's part of one leaf at a time, never a whole stacked leaf or model."""
  index_map = sharding.addressable_devices_indices_map(shape)
  key = lambda index: tuple((s.start, s.stop, s.step) for s in index)
  unique = {key(i): i for i in index_map.values()}
  sizes = lambda index: tuple(len(range(*s.indices(n))) for s, n in zip(index, shape))
  parts = {k: np.empty(sizes(i), dtype) for k, i in unique.items()}
  for layer, tensor in enumerate(layers):
    ours = layout.to_ours(tensor, unit)  # a view of a memory-mapped tensor: nothing read yet
    for k, index in unique.items():
      if not stacked:
        parts[k][...] = ours[index]
      elif layer in range(*index[0].indices(len(layers))):
        parts[k][layer - range(*index[0].indices(len(layers)))[0]] = ours[index[1:]]
  return jax.make_array_from_single_device_arrays(
      shape, sharding, [jax.device_put(parts[key(i)], d) for d, i in index_map.items()])


def to_tensors(params, decls, name_map: dict[str, Tensor]) -> dict[str, np.ndarray]:
  """The inverse of `to_params`: checkpoint-named tensors in the checkpoint's layouts."""
  arrays = jax.tree.structure(decls, is_leaf=is_param).flatten_up_to(params)
  tensors = {}
  for (path, param), a in zip(leaves(decls), arrays):
    a = np.asarray(jax.device_get(a))
    entry = name_map[path]
    for name, layer in zip(_names(entry, param), a if _stacked(param) else [a]):
      tensors[name] = np.ascontiguousarray(entry.layout.to_theirs(layer))
  return tensors


def tensor_shapes(decls, name_map: dict[str, Tensor]) -> dict[str, tuple[int, ...]]:
  """Checkpoint name -> checkpoint shape of every tensor the declarations need."""
  return {name: name_map[path].layout.shape
          for path, param in leaves(decls) for name in _names(name_map[path], param)}
