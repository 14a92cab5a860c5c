"""Ring / all-gather context-parallel attention on 2, 4 and 8 fake CPU devices."""

import jax
import jax.numpy as jnp
import pytest

import kernels
from kernels.tuning import BlockSizes
from tests.attention_refs import inputs, reference, rel

P = jax.P


def sharded(n, strategy, seg):
  mesh = jax.make_mesh((n,), ("context",), axis_types=(jax.sharding.AxisType.Explicit,),
                       devices=jax.devices()[:n])
  spec, seg_spec = P(None, "context"), P(None, "context")
  def local(q, k, v, qs, ks):
    return kernels.ring_attention(q, k, v, axis_name="context", q_segment_ids=qs,
                                  kv_segment_ids=ks, strategy=strategy,
                                  block_sizes=BlockSizes(*(128,) * 8))
  fn = jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec, seg_spec, seg_spec),
                     out_specs=spec, check_vma=False)
  return mesh, fn


# Four ring hops already leave the last shard only masked keys; the 8-hop ring runs in
# tests/test_attention.py's model case (ici_context=8).
@pytest.mark.parametrize("n,strategy", [(2, "ring"), (4, "ring"), (2, "all_gather"),
                                        (8, "all_gather")])
def test_context_parallel_matches_single_device(n, strategy):
  sq = skv = 256
  q, k, v, cot = inputs(sq, skv, 64, jnp.float32)
  # Padding at the end of both sequences: the last shards hold only masked keys for the ring.
  qs = jnp.ones((1, sq), jnp.int32).at[:, sq - 9:].set(0)
  ks = jnp.ones((1, skv), jnp.int32).at[:, skv - 70:].set(0)
  mesh, fn = sharded(n, strategy, True)
  with jax.set_mesh(mesh):
    args = [jax.reshard(x, P(None, "context")) for x in (q, k, v, qs, ks)]
    out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, args[3], args[4]), *args[:3])
    grads = vjp(jax.reshard(cot, P(None, "context")))
  ref_out, ref_vjp = jax.vjp(lambda q, k, v: reference(q, k, v, qs, ks), q, k, v)
  assert rel(out, ref_out) < 1e-5
  for name, g, g_ref in zip("qkv", grads, ref_vjp(cot)):
    assert rel(g, g_ref) < 1e-5, name


def test_ring_bfloat16_without_segment_ids():
  q, k, v, cot = inputs(256, 256, 128, jnp.bfloat16)
  mesh = jax.make_mesh((2,), ("context",), devices=jax.devices()[:2])
  spec = P(None, "context")
  fn = jax.shard_map(lambda q, k, v: kernels.ring_attention(q, k, v, axis_name="context"),
                     mesh=mesh, in_specs=(spec,) * 3, out_specs=spec, check_vma=False)
  with jax.set_mesh(mesh):
    args = [jax.reshard(x, spec) for x in (q, k, v)]
    out, vjp = jax.vjp(fn, *args)
    grads = vjp(jax.reshard(cot.astype(jnp.bfloat16), spec))
  ref_out, ref_vjp = jax.vjp(reference, q, k, v)
  assert out.dtype == jnp.bfloat16 and rel(out.astype(jnp.float32), ref_out) < 2e-2
  for g, g_ref in zip(grads, ref_vjp(cot)):
    assert rel(g.astype(jnp.float32), g_ref) < 2e-2


def test_bad_strategy_raises():
  mesh = jax.make_mesh((2,), ("context",), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=jax.devices()[:2])
  q = jnp.zeros((1, 16, 1, 64))
  fn = jax.shard_map(lambda q: kernels.ring_attention(q, q, q, axis_name="context",
                                                      strategy="ulysses"),
                     mesh=mesh, in_specs=P(None, "context"), out_specs=P(None, "context"),
                     check_vma=False)
  with pytest.raises(ValueError, match="strategy must be"):
    fn(q)
