"""Flash attention kernels (both bodies, interpret mode) against an independent reference."""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernels
from kernels import tile_math
from kernels.tuning import TABLE

from tests.attention_refs import HIGHEST, blocks, inputs, numpy_reference, reference, rel


def check(backend, sq, skv, d, dtype, tol, padded, block):
  q, k, v, cot = inputs(sq, skv, d, dtype)
  seg = {}
  if padded:  # padded text: the last keys and the last queries are padding (id 0)
    seg = dict(q_segment_ids=jnp.ones((1, sq), jnp.int32).at[:, sq - 5:].set(0),
               kv_segment_ids=jnp.ones((1, skv), jnp.int32).at[:, skv - 37:].set(0))
  flash = lambda q, k, v: kernels.flash_attention(q, k, v, **seg, block_sizes=blocks(block),
                                                  backend=backend)
  ref = lambda q, k, v: reference(q, k, v, seg.get("q_segment_ids"), seg.get("kv_segment_ids"))
  out, vjp = jax.vjp(flash, q, k, v)
  ref_out, ref_vjp = jax.vjp(ref, q, k, v)
  assert out.dtype == q.dtype and out.shape == q.shape
  assert rel(out.astype(jnp.float32), ref_out) < tol
  for name, g, g_ref in zip("qkv", vjp(cot.astype(dtype)), ref_vjp(cot)):
    assert g.dtype == dtype
    assert rel(g.astype(jnp.float32), g_ref) < tol, name


# Lengths off the block grid, cross-attention (Sq != Skv), padding ids, D 64/128, both bodies.
@pytest.mark.parametrize("backend,sq,skv,d,padded,block", [
    ("tpu", 300, 200, 64, True, 128),
    ("tpu", 384, 640, 128, False, 256),
    ("gpu", 300, 200, 64, True, 128),
    ("gpu", 200, 456, 128, False, 128),
])
def test_flash_float32(backend, sq, skv, d, padded, block):
  check(backend, sq, skv, d, jnp.float32, 1e-5, padded, block)


@pytest.mark.parametrize("backend", ["tpu", "gpu"])
def test_flash_bfloat16(backend):
  check(backend, 256, 320, 128, jnp.bfloat16, 2e-2, True, 128)


def test_flash_odd_head_dim_and_numpy_reference():
  q, k, v, _ = inputs(130, 130, 96, jnp.float32)
  for backend in ("tpu", "gpu"):  # the GPU body pads D=96 to 128
    out = kernels.flash_attention(q, k, v, backend=backend, block_sizes=blocks(128))
    assert rel(out, numpy_reference(q, k, v)) < 1e-5


def test_default_blocks_and_dict_override():
  q, k, v, _ = inputs(200, 200, 64, jnp.float32, heads=1)
  want = numpy_reference(q, k, v)
  assert rel(kernels.flash_attention(q, k, v), want) < 1e-5
  out = kernels.flash_attention(q, k, v, block_sizes={"block_q": 128, "block_kv": 128,
                                                      "block_kv_compute": 128})
  assert rel(out, want) < 1e-5
  with pytest.raises(ValueError, match="unknown block size names"):
    kernels.flash_attention(q, k, v, block_sizes={"block_x": 128})


def test_bad_inputs_raise():
  q, k, v, _ = inputs(64, 64, 64, jnp.float32)
  with pytest.raises(ValueError, match="must be \\(B, S, H, D\\)"):
    kernels.flash_attention(q[0], k[0], v[0])
  with pytest.raises(ValueError, match="share batch, heads"):
    kernels.flash_attention(q, k[:, :, :1], v[:, :, :1])
  with pytest.raises(ValueError, match="given together"):
    kernels.flash_attention(q, k, v, q_segment_ids=jnp.ones((1, 64), jnp.int32))
  with pytest.raises(ValueError, match="segment ids must be"):
    kernels.flash_attention(q, k, v, q_segment_ids=jnp.ones((1, 63), jnp.int32),
                            kv_segment_ids=jnp.ones((1, 64), jnp.int32))
  with pytest.raises(ValueError, match="head dim 512"):
    big = jnp.zeros((1, 8, 1, 512))
    kernels.flash_attention(big, big, big)


def test_merge_of_split_keys_is_whole_softmax():
  """The ring's lse merge: attention over two key halves merges into attention over all."""
  q, k, v, _ = inputs(64, 96, 64, jnp.float32, heads=3)
  def part(k, v):
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=HIGHEST) * 64 ** -0.5
    lse = jax.nn.logsumexp(s, axis=-1)
    o = jnp.einsum("bhqk,bkhd->bqhd", jnp.exp(s - lse[..., None]), v, precision=HIGHEST)
    return o, lse  # the kernels' layout: out (B, S, H, D), lse (B, H, S)
  out, _ = tile_math.merge(*part(k[:, :40], v[:, :40]), *part(k[:, 40:], v[:, 40:]))
  assert rel(out, numpy_reference(q, k, v)) < 1e-5
  # An empty partial (every key masked) carries lse = MASK_VALUE and must not change the result.
  o, lse = part(k, v)
  empty = (jnp.zeros_like(o), jnp.full_like(lse, tile_math.MASK_VALUE))
  merged, merged_lse = tile_math.merge(o, lse, *empty)
  assert np.all(np.isfinite(merged)) and rel(merged, o) < 1e-6 and rel(merged_lse, lse) < 1e-6


# The GPU each GPU tuning entry is lowered for (the Triton lowering reads its compute capability).
GPU_KINDS = {"h100": "NVIDIA H100", "h200": "NVIDIA H200", "gpu": "NVIDIA H100"}


def _abstract_gpu(key):
  """Lowering for a GPU that this machine lacks: an abstract GPU device of the entry's kind in
  an abstract mesh, which the Triton lowering reads (jax 0.11 asks for one when no GPU is
  present; 0.10 takes it as well)."""
  device = jax.sharding.AbstractDevice(device_kind=GPU_KINDS[key], num_cores=None,
                                       platform="gpu")
  return jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("x",),
                                                                  abstract_device=device))


@pytest.mark.parametrize("key", sorted(TABLE))
def test_table_entry_lowers_for_its_platform(key):
  """Every tuning entry goes through the real Mosaic / Triton lowering, forward and backward."""
  backend = "gpu" if key in ("h100", "h200", "gpu") else "tpu"
  shape = jax.ShapeDtypeStruct((1, 4096, 2, 128), jnp.bfloat16)
  seg = jax.ShapeDtypeStruct((1, 4096), jnp.int32)
  def loss(q, k, v, qs, ks):
    out = kernels.flash_attention(q, k, v, q_segment_ids=qs, kv_segment_ids=ks,
                                  block_sizes=TABLE[key], backend=backend, interpret=False)
    return jnp.sum(out.astype(jnp.float32))
  grad = jax.grad(loss, argnums=(0, 1, 2))
  platform = "cuda" if backend == "gpu" else "tpu"
  with _abstract_gpu(key) if backend == "gpu" else contextlib.nullcontext():
    text = jax.jit(grad).trace(shape, shape, shape, seg, seg).lower(
        lowering_platforms=(platform,)).as_text()
  marker = "triton" if backend == "gpu" else "tpu_custom_call"
  # forward (saved for the backward), dK/dV and dQ kernels
  assert text.count(marker) >= 3


def test_tpu_tiles_pad_least_and_gpu_tiles_are_powers_of_two():
  """A tile never exceeds the tuned block; on TPU it is an exact divisor of the sequence where
  one is at least half the block (no padding copy), else the sequence's equal split."""
  from kernels.flash import _clamp
  assert _clamp(3072, 75776, "tpu", align=256) == 2048   # 37 tiles, nothing padded
  assert _clamp(2048, 75776, "tpu", align=1024) == 2048
  assert _clamp(3072, 18900, "tpu") == 2816              # 7 x 2816 = 19,712, not 21,504
  assert _clamp(3072, 75600, "tpu") == 3072              # no 128-multiple divides 75,600
  assert _clamp(2048, 512, "tpu", align=1024) == 512     # short text keys stay one tile
  assert _clamp(512, 40, "tpu") == 128
  assert _clamp(128, 6144, "gpu") == 128 and _clamp(128, 40, "gpu") == 64
