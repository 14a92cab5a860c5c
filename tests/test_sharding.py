"""Mesh construction and the logical-axis rule table."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wan import sharding

ONES = dict(data=1, fsdp=1, context=1, tensor=1)


def test_fill_axis_takes_remaining_devices():
  mesh = sharding.make_mesh(dict(ONES, fsdp=-1, tensor=2), ONES)
  assert dict(mesh.shape) == dict(data=1, fsdp=4, context=1, tensor=2)
  assert mesh.devices.size == len(jax.devices())


@pytest.mark.parametrize("ici, message", [
    (dict(ONES, fsdp=3), "multiplies to 3 but there are 8 devices"),
    (dict(ONES, fsdp=-1, tensor=-1), "at most one ici parallelism may be -1"),
    (dict(ONES, fsdp=-1, tensor=3), "does not divide 8 devices"),
    (dict(ONES, fsdp=0), "must be positive or -1"),
])
def test_bad_parallelism_says_what_to_change(ici, message):
  with pytest.raises(ValueError, match=message):
    sharding.make_mesh(ici, ONES)


def test_spec_uses_each_mesh_axis_once_and_skips_non_dividing_axes():
  mesh = sharding.make_mesh(dict(ONES, data=2, fsdp=2, tensor=2), ONES)
  assert sharding.spec(("batch", "length", "act_embed"), (4, 6, 8), mesh) == \
      jax.P(("data", "fsdp"), None, None)
  # 6 is not divisible by data*fsdp = 4: drop fsdp, keep data.
  assert sharding.spec(("batch",), (6,), mesh) == jax.P("data")
  # A batch too small for fsdp leaves it to the sequence (and to nothing else).
  assert sharding.spec(("batch", "length", "act_embed"), (2, 6, 8), mesh) == \
      jax.P("data", "fsdp", None)
  assert sharding.spec(("batch", "length", "act_embed"), (1, 6, 8), mesh) == \
      jax.P(None, "fsdp", None)
  assert sharding.spec(("batch", "length", "act_embed"), (2, 5, 8), mesh) == \
      jax.P("data", None, None)
  # "embed" wants fsdp, but batch already took it.
  assert sharding.spec(("batch", "embed"), (4, 8), mesh) == jax.P(("data", "fsdp"), None)
  with pytest.raises(KeyError, match="no entry"):
    sharding.spec(("nonsense",))


def test_constrain_is_noop_without_mesh_and_shards_with_one():
  x = jnp.arange(8 * 6 * 4, dtype=jnp.float32).reshape(8, 6, 4)
  np.testing.assert_array_equal(sharding.constrain(x, ("batch", "length", "act_embed")), x)
  mesh = sharding.make_mesh(dict(ONES, fsdp=4, context=2), ONES)
  with jax.set_mesh(mesh):
    y = jax.jit(lambda x: sharding.constrain(x + 1, ("batch", "length", "act_embed")))(x)
  assert y.sharding.spec == jax.P("fsdp", "context")
  np.testing.assert_array_equal(y, x + 1)


def test_param_spec_moves_fsdp_to_a_dimension_it_divides():
  sizes = dict(data=1, fsdp=3, context=1, tensor=2)
  # "embed" (32) is not divisible by 3: fsdp goes to the largest dim it divides (48), never to
  # the scanned layers axis (the first, 6).
  spec, left = sharding.param_spec(("layers", "embed", "mlp"), (6, 32, 48), sizes)
  assert spec == jax.P(None, None, ("tensor", "fsdp")) and left == ()
  spec, left = sharding.param_spec(("layers", "embed", None), (6, 32, 20), sizes)
  assert spec == jax.P(None, None, None) and left == ("fsdp",)  # nowhere: reported
  # A parameter without logical axes stays replicated by declaration (the VAE's).
  assert sharding.param_spec((None, None), (30, 30), sizes) == (jax.P(None, None), ())
  # Activations keep dropping what does not divide, silently and on purpose.
  assert sharding.spec(("batch", "length"), (6, 32), dict(data=4, fsdp=1, context=1,
                                                          tensor=1)) == jax.P(None, None)


def test_dcn_granules_are_tpu_slices_and_other_platforms_hosts():
  """A one-slice TPU pod is one granule however many hosts it has (its ICI joins them all), so
  `ici_fsdp=-1` spans the whole slice; several slices are several; GPU and CPU hosts are
  granules."""
  from types import SimpleNamespace as Device
  pod = [Device(platform="tpu", slice_index=0, process_index=i // 4) for i in range(64)]
  assert sharding.granules(pod) == ("slice", 1)
  aot = [Device(platform="tpu", slice_index=None, process_index=i // 4) for i in range(16)]
  assert sharding.granules(aot) == ("slice", 1)  # topology devices of an AOT compile
  two = [Device(platform="tpu", slice_index=i // 8, process_index=i // 4) for i in range(16)]
  assert sharding.granules(two) == ("slice", 2)
  gpus = [Device(platform="gpu", process_index=i // 8) for i in range(16)]
  assert sharding.granules(gpus) == ("process", 2)
  ici, dcn = sharding.mesh_shape({"data": 1, "fsdp": -1, "context": 1, "tensor": 1},
                                 {"data": -1, "fsdp": 1, "context": 1, "tensor": 1}, 64,
                                 sharding.granules(pod)[1])
  assert ici["fsdp"] == 64 and dcn["data"] == 1
