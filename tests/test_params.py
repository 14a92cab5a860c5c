"""Parameter declarations: init, abstract shapes and shardings all derive from one tree."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wan import params, sharding

DECLS = {
    "proj": {"w": params.Param((16, 32), ("embed", "mlp")),
             "b": params.Param((32,), ("mlp",), params.zeros)},
    "norm": params.Param((16,), (None,), params.ones, dtype=jnp.float32),
}


def test_placements_report_bytes_and_what_stays_whole():
  mesh = dict(data=1, fsdp=3, context=1, tensor=1)  # 3 divides neither 16 nor 32
  placed = {r.path: r for r in params.placements(DECLS, mesh, jnp.bfloat16)}
  assert placed["proj/w"].unplaced == ("fsdp",) and placed["proj/w"].nbytes == 16 * 32 * 2
  assert placed["norm"].unplaced == () and placed["norm"].nbytes == 16 * 4  # pinned float32
  assert placed["proj/w"].per_device_bytes(mesh) == 16 * 32 * 2
  assert params.nbytes(DECLS, jnp.bfloat16) == (16 * 32 + 32) * 2 + 16 * 4


def test_init_matches_declared_shapes_and_dtypes():
  p = params.init(DECLS, jax.random.key(0), jnp.bfloat16)
  assert p["proj"]["w"].shape == (16, 32) and p["proj"]["w"].dtype == jnp.bfloat16
  assert p["norm"].dtype == jnp.float32  # pinned dtype wins over the model dtype
  np.testing.assert_array_equal(p["proj"]["b"], 0)
  np.testing.assert_array_equal(p["norm"], 1)
  # PyTorch's Linear default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in = 16.
  w = np.asarray(p["proj"]["w"], np.float32)
  assert np.abs(w).max() <= 0.25 and w.std() > 0.1


def test_abstract_equals_eval_shape_of_init():
  got = params.abstract(DECLS, jnp.bfloat16)
  want = jax.eval_shape(lambda k: params.init(DECLS, k, jnp.bfloat16), jax.random.key(0))
  assert jax.tree.map(lambda a, b: a.shape == b.shape and a.dtype == b.dtype, got, want) == \
      jax.tree.map(lambda _: True, want)


def test_init_is_stable_per_path():
  # Adding a parameter must not change the initial value of the others.
  a = params.init(DECLS, jax.random.key(3))
  b = params.init(dict(DECLS, extra=params.Param((4,), (None,))), jax.random.key(3))
  np.testing.assert_array_equal(a["proj"]["w"], b["proj"]["w"])


def test_stack_adds_layer_axis_with_independent_layers():
  s = params.stack(DECLS, 3)
  assert s["proj"]["w"].shape == (3, 16, 32) and s["proj"]["w"].axes == ("layers", "embed", "mlp")
  p = params.init(s, jax.random.key(0))
  assert not np.allclose(p["proj"]["w"][0], p["proj"]["w"][1])
  assert params.count(s) == 3 * (16 * 32 + 32 + 16)


def test_mismatched_rank_is_an_error():
  with pytest.raises(ValueError, match="differ in rank"):
    params.Param((3, 4), ("embed",))


def test_shardings_follow_rule_table_on_fake_devices():
  mesh = sharding.make_mesh(dict(data=1, fsdp=4, context=1, tensor=2),
                            dict(data=1, fsdp=1, context=1, tensor=1))
  specs = params.partition_specs(params.stack(DECLS, 3), mesh)
  assert specs["proj"]["w"] == jax.P(None, "fsdp", "tensor")
  # A stacked bias names no fsdp axis, but is an FSDP parameter: split along its largest dim.
  assert specs["proj"]["b"] == jax.P(None, ("tensor", "fsdp"))
  assert specs["norm"] == jax.P(None, None)  # no sharded logical axis: replicated
  placed = jax.jit(lambda k: params.init(DECLS, k),
                   out_shardings=params.shardings(DECLS, mesh))(jax.random.key(0))
  assert placed["proj"]["w"].sharding.spec == jax.P("fsdp", "tensor")
  np.testing.assert_array_equal(placed["proj"]["w"], params.init(DECLS, jax.random.key(0))["proj"]["w"])
