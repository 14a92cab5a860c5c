"""Attention routing (wan/attention.py): every implementation against dot_product, alone and
under meshes (the ring over context 4 and over context 2 x fsdp 4), and the model's loss and
gradients with flash and ring (context 2/4, tokens split over fsdp); bfloat16 rings:
tests/test_kernels_ring.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import wan21_i2v, wan21_t2v
from wan import attention, data, plan, train

P = jax.P


def _qkv(sq=48, skv=48, heads=4, d=32, dtype=jnp.float32):
  keys = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(keys[0], (2, sq, heads, d), dtype)
  k = jax.random.normal(keys[1], (2, skv, heads, d), dtype)
  v = jax.random.normal(keys[2], (2, skv, heads, d), dtype)
  return q, k, v


def _padding(skv, valid=(17, 9)):
  """Text-style padding masks: sample i has valid[i] real tokens, then padding."""
  return (jnp.arange(skv)[None, :] < jnp.array(valid)[:, None]).astype(jnp.int32)


def _rel(a, b):
  return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def _mesh(**sizes):
  shape = {"data": 1, "fsdp": 1, "context": 1, "tensor": 1, **sizes}
  n = int(np.prod(list(shape.values())))
  return jax.sharding.Mesh(np.asarray(jax.devices()[:n]).reshape(list(shape.values())),
                           tuple(shape), axis_types=(jax.sharding.AxisType.Auto,) * 4)


def _value_and_grads(impl, q, k, v, segs, mesh=None, **kw):
  def f(q, k, v):
    out = attention.attention(q, k, v, impl=impl, q_segment_ids=segs and segs[0],
                              kv_segment_ids=segs and segs[1], **kw)
    return jnp.sum(out * jnp.cos(out)), out  # a cotangent that is not all ones
  fn = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))
  if mesh is None:
    (_, out), grads = fn(q, k, v)
  else:
    with jax.set_mesh(mesh):
      (_, out), grads = fn(q, k, v)
  return out, grads


def _assert_matches_dot_product(impl, q, k, v, segs, mesh=None, tol=1e-5, **kw):
  out, grads = _value_and_grads(impl, q, k, v, segs, mesh, **kw)
  ref_out, ref_grads = _value_and_grads("dot_product", q, k, v, segs, precision="highest")
  assert _rel(out, ref_out) < tol
  for name, g, g_ref in zip("qkv", grads, ref_grads):
    assert _rel(g, g_ref) < tol, name


def _primitives(impl, q, k, v, mesh, **kw):
  with jax.set_mesh(mesh):
    return str(jax.make_jaxpr(lambda q, k, v: attention.attention(q, k, v, impl=impl, **kw))(
        q, k, v))


@pytest.mark.parametrize("impl", ["flash", "ring"])
@pytest.mark.parametrize("cross", [False, True])
def test_kernels_without_mesh_match_dot_product(impl, cross):
  q, k, v = _qkv(skv=24 if cross else 48)
  segs = (jnp.ones((2, 48), jnp.int32), _padding(24)) if cross else None
  _assert_matches_dot_product(impl, q, k, v, segs)


@pytest.mark.parametrize("impl, sizes", [
    ("flash", dict(fsdp=2, context=2, tensor=2)),
    ("ring", dict(context=4, tensor=2)),
    ("ring", dict(data=2, context=4)),
    ("ring", dict(fsdp=4, context=2))])  # a batch of 2 leaves fsdp to the sequence: an 8-hop ring
@pytest.mark.parametrize("cross", [False, True])
def test_kernels_under_a_mesh_match_dot_product(impl, sizes, cross):
  q, k, v = _qkv(skv=24 if cross else 48)
  segs = (jnp.ones((2, 48), jnp.int32), _padding(24)) if cross else None
  _assert_matches_dot_product(impl, q, k, v, segs, _mesh(**sizes))


def test_routes_use_the_kernels():
  q, k, v = _qkv()
  mesh = _mesh(context=4, tensor=2)
  assert "pallas_call" in _primitives("flash", q, k, v, mesh)
  assert "pallas_call" not in _primitives("dot_product", q, k, v, mesh)
  ring = _primitives("ring", q, k, v, mesh)
  assert "pallas_call" in ring and "ppermute" in ring
  cross = _primitives("ring", q, k[:, :24], v[:, :24], mesh)  # short K/V: gathered, no ring
  assert "pallas_call" in cross and "ppermute" not in cross
  # Below flash_min_seq_length every route is dot_product.
  assert "pallas_call" not in _primitives("ring", q, k, v, mesh, min_seq_length=49)


def test_min_seq_length_falls_back_to_dot_product_exactly():
  q, k, v = _qkv()
  want = attention.dot_product(q, k, v)
  got = attention.attention(q, k, v, impl="flash", min_seq_length=64)
  np.testing.assert_array_equal(got, want)


def _numpy_attention_and_grads(q, k, v, mask, cot):
  """float64 NumPy softmax attention and its gradients (q, k, v) for the cotangent `cot`;
  mask (B, Sq, Skv) bool, a row without any key attends uniformly (as the -inf-free softmax)."""
  q, k, v, cot = (np.asarray(x, np.float64) for x in (q, k, v, cot))
  scale = q.shape[-1] ** -0.5
  s = np.einsum("bqhd,bkhd->bhqk", q, k) * scale
  s = np.where(mask[:, None], s, np.finfo(np.float32).min)
  p = np.exp(s - s.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  out = np.einsum("bhqk,bkhd->bqhd", p, v)
  d_v = np.einsum("bhqk,bqhd->bkhd", p, cot)
  d_p = np.einsum("bqhd,bkhd->bhqk", cot, v)
  d_s = p * (d_p - (d_p * p).sum(-1, keepdims=True)) * np.where(mask[:, None], 1.0, 0.0)
  return out, (np.einsum("bhqk,bkhd->bqhd", d_s, k) * scale,
               np.einsum("bhqk,bqhd->bkhd", d_s, q) * scale, d_v)


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 2e-6), (jnp.bfloat16, 3e-2)])
def test_dot_product_forward_and_gradients_match_float64(dtype, tol):
  """The hand-written backward (probabilities recomputed from the row max and sum) against
  float64 NumPy, with padded keys and a query segment that has no keys at all."""
  q, k, v = _qkv(skv=24, dtype=dtype)
  cot = jax.random.normal(jax.random.key(3), q.shape, jnp.float32)
  q_ids = jnp.ones((2, 48), jnp.int32).at[1, 40:].set(5)  # queries 40.. of sample 1: no keys
  kv_ids = _padding(24)
  mask = np.asarray(q_ids)[:, :, None] == np.asarray(kv_ids)[:, None, :]
  f = lambda q, k, v: attention.dot_product(q, k, v, q_segment_ids=q_ids, kv_segment_ids=kv_ids,
                                            precision="highest")
  out, vjp = jax.vjp(f, q, k, v)
  grads = vjp(cot.astype(dtype))
  want_out, want_grads = _numpy_attention_and_grads(
      *(x.astype(jnp.float32) for x in (q, k, v)), mask,
      cot.astype(dtype).astype(jnp.float32))
  assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
  assert _rel(out.astype(jnp.float32), want_out) < tol
  for got, want in zip(grads, want_grads):
    assert _rel(got.astype(jnp.float32), want) < tol
  # Gradients of keys outside every query's segment are exactly zero.
  assert not np.any(np.asarray(grads[1][0, 17:], np.float32))


def test_split_head_dim_false_folds_heads_into_batch():
  q, k, v = _qkv(skv=24)
  segs = (jnp.ones((2, 48), jnp.int32), _padding(24))
  want = attention.dot_product(q, k, v, q_segment_ids=segs[0], kv_segment_ids=segs[1])
  jaxpr = str(jax.make_jaxpr(lambda q, k, v: attention.dot_product(
      q, k, v, split_head_dim=False))(q, k, v))
  assert "f32[8,48,1,32]" in jaxpr  # (B*H, S, 1, D)
  got = attention.dot_product(q, k, v, q_segment_ids=segs[0], kv_segment_ids=segs[1],
                              split_head_dim=False)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_bfloat16_flash_within_tolerance():
  q, k, v = _qkv(dtype=jnp.bfloat16)
  out = attention.attention(q, k, v, impl="flash")
  want = attention.dot_product(*(x.astype(jnp.float32) for x in (q, k, v)),
                               precision="highest")
  assert out.dtype == jnp.bfloat16 and _rel(out.astype(jnp.float32), want) < 2e-2


def test_bad_arguments_raise():
  q, k, v = _qkv()
  with pytest.raises(ValueError, match="not one of"):
    attention.attention(q, k, v, impl="splash")
  with pytest.raises(ValueError, match="given together"):
    attention.attention(q, k, v, impl="flash", q_segment_ids=jnp.ones((2, 48), jnp.int32))
  with pytest.raises(ValueError, match="unknown block size names"):
    attention.attention(q, k, v, impl="flash", block_sizes=(("block_z", 128),))


def test_cudnn_on_cpu_is_refused_before_any_work():
  c = wan21_t2v.get_config("tiny")
  c.attention = "cudnn_flash_te"
  with pytest.raises(ValueError, match="cudnn_flash_te runs cuDNN flash attention on NVIDIA"):
    plan.make(c, jax.devices()[:1])


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN needs an NVIDIA GPU")
def test_cudnn_matches_dot_product_on_gpu():
  q, k, v = _qkv(sq=256, skv=128, heads=4, d=128, dtype=jnp.bfloat16)
  segs = (jnp.ones((2, 256), jnp.int32), _padding(128, (100, 37)))
  out, _ = _value_and_grads("cudnn_flash_te", q, k, v, segs)
  ref, _ = _value_and_grads("dot_product", *(x.astype(jnp.float32) for x in (q, k, v)), segs)
  assert _rel(out.astype(jnp.float32), ref) < 2e-2


# --- the model ------------------------------------------------------------------------------

def _loss_and_grads(module, attn, devices, **overrides):
  c = module.get_config("tiny")
  c.update(checkpoint_every=-1, write_metrics=False, global_batch_size=4, precision="HIGHEST",
           attention=attn, **overrides)
  run = train.setup(plan.make(c, devices), devices)
  state = train.init_state(run)
  batch = next(data.make(run.plan, run.mesh))
  fn = jax.value_and_grad(lambda p: train.loss_fn(p, batch, jax.random.key(3), run.plan),
                          has_aux=True)
  with jax.set_mesh(run.mesh):
    (loss, _), grads = jax.jit(fn)(state["params"])
  return float(loss), jax.device_get(grads)


@pytest.fixture(scope="module")
def dot_product_reference():
  return {m: _loss_and_grads(m, "dot_product", jax.devices()[:1]) for m in (wan21_t2v, wan21_i2v)}


@pytest.mark.parametrize("module, attn, mesh", [
    (wan21_t2v, "flash", dict()),
    (wan21_t2v, "flash", dict(ici_fsdp=8)),  # a batch of 4: its tokens split over fsdp
    (wan21_t2v, "flash", dict(ici_fsdp=2, ici_context=2, ici_tensor=2, remat_policy="CUSTOM",
                              names_which_can_be_saved=("flash_residuals",))),
    (wan21_t2v, "ring", dict(ici_fsdp=4, ici_context=2, attention_sharding_uniform=False)),
    (wan21_t2v, "dot_product", dict(ici_fsdp=2, ici_context=4, split_head_dim=False)),
    (wan21_t2v, "ring", dict(ici_fsdp=2, ici_context=4, remat_policy="CUSTOM",
                             names_which_can_be_saved=("flash_residuals",))),
    (wan21_i2v, "ring", dict(ici_data=2, ici_fsdp=1, ici_context=2, ici_tensor=2))])
def test_model_loss_and_gradients_match_dot_product(dot_product_reference, module, attn, mesh):
  """Text padding masks (mask_padding_tokens) and, for I2V, 257 image tokens go through the
  kernels' cross-attention; self-attention runs the ring over the context axis; two cases
  save the kernels' residuals for the backward (remat) instead of running them again."""
  want_loss, want_grads = dot_product_reference[module]
  devices = jax.devices() if mesh else jax.devices()[:1]
  loss, grads = _loss_and_grads(module, attn, devices, **mesh)
  assert abs(loss - want_loss) <= 1e-5 * abs(want_loss)
  for path, g, g_ref in zip(jax.tree_util.tree_leaves_with_path(grads),
                            jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
    assert np.linalg.norm(g - g_ref) <= 1e-5 * np.linalg.norm(g_ref) + 1e-12, path[0]
