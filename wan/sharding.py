"""Device mesh and the one logical-axis rule table.

Parameters and activations name their dimensions with logical axes ("embed", "heads", "batch",
"length", ...). `RULES` maps each logical axis to zero or more mesh axes; everything that places
an array (parameter shardings, optimizer state, activation constraints) goes through `spec`.

Mesh axes: data (pure data parallel), fsdp (data parallel with parameters and optimizer state
sharded), context (sequence parallel), tensor (heads / MLP hidden parallel).

A batch smaller than data x fsdp (one 720p video on a v5p-8) leaves fsdp to the sequence: the
tokens split over the fsdp devices, which then gather each layer's weights as FSDP does and
attend against gathered K/V (or, with ring attention, pass K/V around context x fsdp). Left
whole instead, every device would hold all tokens and split each matmul over its hidden
dimension, gathering and all-reducing activations in every layer.
"""

import math

import jax
import numpy as np
from jax.experimental import mesh_utils

MESH_AXES = ("data", "fsdp", "context", "tensor")
FSDP_AXIS = "fsdp"  # parameters and optimizer state are split over it

# logical axis -> mesh axes, in priority order. Parameter axes first, then activation axes.
RULES = (
    # parameters
    ("layers", ()),
    ("embed", ("fsdp",)),
    ("heads", ("tensor",)),
    ("mlp", ("tensor",)),
    ("vocab", ("tensor",)),
    # activations
    ("batch", ("data", "fsdp")),
    ("length", ("context", "fsdp")),  # fsdp only where the batch cannot take it (see below)
    ("kv_length", ()),
    ("act_embed", ()),
    ("act_heads", ("tensor",)),
    ("act_mlp", ("tensor",)),
)


def _mesh_axes_for(name, rules):
  if name is None:
    return ()
  for logical, mesh_axes in rules:
    if logical == name:
      return tuple(mesh_axes)
  raise KeyError(f"logical axis {name!r} has no entry in the sharding rule table")


def axis_sizes(mesh) -> dict:
  """Axis sizes of a Mesh, an AbstractMesh or a plain {axis: size} dict."""
  return dict(mesh if isinstance(mesh, dict) else mesh.shape)


def spec(axes, shape=None, mesh=None, rules=RULES) -> jax.P:
  """PartitionSpec for an array whose dimensions carry the logical names `axes`.

  A mesh axis is used at most once per array (first dimension wins). With `mesh` and `shape`
  given, mesh axes whose combined size does not divide a dimension are dropped from the end of
  that dimension's list, so activations of any size place (a batch of 6 on data x fsdp = 4
  keeps data only). Parameters go through `param_spec`, which never drops an axis silently.
  """
  return _spec(axes, shape, None if mesh is None else axis_sizes(mesh), rules)[0]


def _spec(axes, shape, sizes, rules):
  """(PartitionSpec, mesh axes the rules asked for that no dimension could take)."""
  used, dropped, entries = set(), [], []
  for dim, name in enumerate(axes):
    mesh_axes = [a for a in _mesh_axes_for(name, rules) if a not in used]
    if sizes is not None:
      mesh_axes = [a for a in mesh_axes if sizes.get(a, 1) > 1]
      if shape is not None:
        while mesh_axes and shape[dim] % math.prod(sizes[a] for a in mesh_axes):
          dropped.append(mesh_axes.pop())
    used.update(mesh_axes)
    entries.append(mesh_axes)
  return _to_spec(entries), tuple(a for a in dropped if a not in used)


def _to_spec(entries) -> jax.P:
  return jax.P(*(None if not e else e[0] if len(e) == 1 else tuple(e) for e in entries))


def param_spec(axes, shape, mesh, rules=RULES) -> tuple[jax.P, tuple[str, ...]]:
  """PartitionSpec of a parameter, and the mesh axes it stays replicated along against the rules.

  As `spec`, with two differences. A parameter that names any sharded logical axis is an FSDP
  parameter: it is split over `fsdp` along some dimension even where no rule says which (a
  stacked bias (layers, mlp)); parameters declared with no logical axes (the VAE's) stay
  replicated. And a mesh axis that does not divide the dimension its rule names moves to the
  largest other dimension it divides (as big_vision's fsdp rule shards the largest divisible
  dimension), never to the stacked "layers" axis that `lax.scan` slices. Axes that fit nowhere
  are returned, so that the plan can refuse large parameters left whole on every device.
  """
  sizes = axis_sizes(mesh)
  spec_, unplaced = _spec(axes, shape, sizes, rules)
  entries = [[] if e is None else [e] if isinstance(e, str) else list(e) for e in spec_]
  used = {a for e in entries for a in e}
  if (FSDP_AXIS not in used and FSDP_AXIS not in unplaced and sizes.get(FSDP_AXIS, 1) > 1
      and any(name not in (None, "layers") for name in axes)):
    unplaced += (FSDP_AXIS,)
  left = []
  for axis in unplaced:
    dims = sorted((d for d, name in enumerate(axes) if name != "layers"),
                  key=lambda d: -shape[d])
    for d in dims:
      if shape[d] % (math.prod(sizes[a] for a in entries[d]) * sizes[axis]) == 0:
        entries[d].append(axis)
        break
    else:
      left.append(axis)
  return _to_spec(entries), tuple(left)


def auto_mesh():
  """The mesh set around the code being traced, or None: none set, or inside a shard_map (its
  axes manual), where sharding constraints do not apply."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or any(t == jax.sharding.AxisType.Manual for t in mesh.axis_types):
    return None
  return mesh


def axes_of(entry) -> tuple[str, ...]:
  """One PartitionSpec entry (None, an axis name or a tuple of them) as a tuple of axis names."""
  return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def constrain(x: jax.Array, axes, rules=RULES) -> jax.Array:
  """Sharding constraint on an activation by logical axes; a no-op outside a mesh context."""
  mesh = auto_mesh()
  if mesh is None:
    return x
  return jax.lax.with_sharding_constraint(x, spec(axes, x.shape, mesh, rules))


def to_host(x) -> np.ndarray:
  """A global array's whole value on every process (gathered across hosts when it is split
  over devices of other processes)."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def _fill(sizes: dict, total: int, what: str) -> dict:
  """Replaces the single -1 entry in `sizes` so that the product equals `total`."""
  free = [k for k, v in sizes.items() if v == -1]
  if len(free) > 1:
    raise ValueError(f"at most one {what} parallelism may be -1 (fill); got {free}")
  fixed = math.prod(v for v in sizes.values() if v != -1)
  if any(v == 0 or v < -1 for v in sizes.values()):
    raise ValueError(f"{what} parallelism sizes must be positive or -1; got {sizes}")
  if free:
    if total % fixed:
      raise ValueError(f"{what} parallelism {sizes}: the fixed sizes multiply to {fixed}, which "
                       f"does not divide {total} devices; change them so their product divides "
                       f"{total}")
    sizes = dict(sizes, **{free[0]: total // fixed})
  if math.prod(sizes.values()) != total:
    raise ValueError(f"{what} parallelism {sizes} multiplies to {math.prod(sizes.values())} but "
                     f"there are {total} devices; make the product {total} or set one axis to -1")
  return sizes


def mesh_shape(ici: dict, dcn: dict, num_devices: int, num_slices: int):
  """Resolves -1 entries: (ici sizes, dcn sizes), each a dict over MESH_AXES."""
  if num_devices % num_slices:
    raise ValueError(f"{num_devices} devices do not split into {num_slices} slices/hosts")
  dcn = _fill(dict(dcn), num_slices, "dcn")
  ici = _fill(dict(ici), num_devices // num_slices, "ici")
  return ici, dcn


def granules(devices) -> tuple[str, int]:
  """What the DCN axes span: ("slice", n) TPU slices (all the hosts of one slice share its ICI,
  so a one-slice pod is one granule), else ("process", n) hosts (GPU clusters, CPU)."""
  if devices[0].platform == "tpu":  # topology devices (AOT compiles) carry no slice_index
    return "slice", len({getattr(d, "slice_index", 0) or 0 for d in devices})
  return "process", len({d.process_index for d in devices})


def make_mesh(ici: dict, dcn: dict, devices=None) -> jax.sharding.Mesh:
  """Mesh over MESH_AXES from ici (within a slice/host) and dcn (across them) sizes.

  `ici` / `dcn`: {"data": n, "fsdp": n, "context": n, "tensor": n}, one entry per axis may be -1.
  DCN granules are TPU slices when there are several, otherwise processes (hosts).
  """
  devices = list(jax.devices() if devices is None else devices)
  kind, count = granules(devices)
  ici, dcn = mesh_shape(ici, dcn, len(devices), count)
  ici_shape = [ici[a] for a in MESH_AXES]
  dcn_shape = [dcn[a] for a in MESH_AXES]
  if count > 1:
    grid = mesh_utils.create_hybrid_device_mesh(
        ici_shape, dcn_shape, devices, process_is_granule=kind == "process")
  else:
    try:
      grid = mesh_utils.create_device_mesh(ici_shape, devices)
    except (AssertionError, NotImplementedError, ValueError):
      # Topology-aware placement is not known for every platform; fall back to device order.
      grid = np.asarray(devices).reshape(ici_shape)
  return jax.sharding.Mesh(grid, MESH_AXES,
                           axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))
