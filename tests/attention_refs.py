"""Attention references and inputs shared by the kernel and ring tests."""

import jax
import jax.numpy as jnp
import numpy as np

from kernels.tuning import BlockSizes

HIGHEST = jax.lax.Precision.HIGHEST


def reference(q, k, v, q_seg=None, kv_seg=None):
  """Plain float32 softmax attention, (B, S, H, D), scale 1/sqrt(D)."""
  q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
  s = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=HIGHEST) * q.shape[-1] ** -0.5
  if q_seg is not None:
    s = jnp.where(q_seg[:, None, :, None] == kv_seg[:, None, None, :], s, -1e30)
  return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, axis=-1), v, precision=HIGHEST)


def numpy_reference(q, k, v):
  """float64 NumPy attention, the fully independent check of the forward."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  s = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
  p = np.exp(s - s.max(-1, keepdims=True))
  return np.einsum("bhqk,bkhd->bqhd", p / p.sum(-1, keepdims=True), v)


def rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def blocks(n):
  return BlockSizes(n, n, n, n, n, n, n, n)


def inputs(sq, skv, d, dtype, heads=2, seed=0):
  kq, kk, kv, kc = jax.random.split(jax.random.PRNGKey(seed), 4)
  q = jax.random.normal(kq, (1, sq, heads, d), jnp.float32).astype(dtype)
  k = jax.random.normal(kk, (1, skv, heads, d), jnp.float32).astype(dtype)
  v = jax.random.normal(kv, (1, skv, heads, d), jnp.float32).astype(dtype)
  cot = jax.random.normal(kc, (1, sq, heads, d), jnp.float32)
  return q, k, v, cot
