"""Per-tile attention math shared by the TPU and GPU kernel bodies and the ring merge, and the
one layout both bodies read.

All statistics are float32. Masked scores use a finite MASK_VALUE rather than -inf so that a
fully masked row (padding, or a ring shard holding none of a query's keys) never produces
`-inf - -inf = NaN`; its probabilities are zeroed explicitly instead.
"""

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def tokens(x):
  """(B, S, H, D) -> (B, S, H·D): a reshape of contiguous memory, no copy."""
  b, s, h, d = x.shape
  return x.reshape(b, s, h * d)


def head_tile(rows, d, index):
  """BlockSpec of one head's (rows, D) tile of a (B, S, H·D) array: the kernels read the
  model's layout directly instead of a (B, H, S, D) transpose of it. index(*grid ids) gives
  (batch, row block, head); D must be a multiple of 128 on TPU (a lane-aligned column block)."""
  return pl.BlockSpec((None, rows, d), index)


def scores(q, k, scale, mask):
  """q: (bq, D), k: (bk, D) -> float32 scores (bq, bk); masked entries set to MASK_VALUE."""
  s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())),
                          preferred_element_type=jnp.float32) * scale
  return s if mask is None else jnp.where(mask, s, MASK_VALUE)


def online_softmax_step(m, l, acc, s, v, mask):
  """One kv tile of the online softmax.

  m, l: (bq, 1) running max and denominator; acc: (bq, D) unnormalised output; s: (bq, bk)
  scores; v: (bk, D). Returns the updated (m, l, acc).
  """
  m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
  p = jnp.exp(s - m_new)
  if mask is not None:
    p = jnp.where(mask, p, 0.0)
  alpha = jnp.exp(m - m_new)
  l = alpha * l + jnp.sum(p, axis=1, keepdims=True)
  acc = alpha * acc + jax.lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                                          preferred_element_type=jnp.float32)
  return m_new, l, acc


def finalize(m, l, acc):
  """(m, l, acc) -> (out (bq, D) float32, lse (bq, 1)); rows with no visible key give 0, MASK."""
  empty = l == 0.0
  l_safe = jnp.where(empty, 1.0, l)
  return acc / l_safe, jnp.where(empty, MASK_VALUE, m + jnp.log(l_safe))


def probs_t(k, q, lse_row, scale, mask_t):
  """Transposed recomputed probabilities p^T = exp(k q^T * scale - lse): (bk, bq).

  lse_row: (1, bq). Working transposed keeps the per-query statistics along lanes, so the
  dK/dV kernel never needs a (bq, 1) -> (1, bq) relayout.
  """
  s_t = jax.lax.dot_general(k, q, (((1,), (1,)), ((), ())),
                            preferred_element_type=jnp.float32) * scale
  p_t = jnp.exp(s_t - lse_row)
  return p_t if mask_t is None else jnp.where(mask_t, p_t, 0.0)


def dkv_step(q, k, v, do, lse_row, di_row, scale, mask_t):
  """dK, dV contributions (bk, D) float32 of one (kv tile, q tile) pair (FA2 backward)."""
  p_t = probs_t(k, q, lse_row, scale, mask_t)
  dv = jax.lax.dot_general(p_t.astype(do.dtype), do, (((1,), (0,)), ((), ())),
                           preferred_element_type=jnp.float32)
  dp_t = jax.lax.dot_general(v, do, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
  ds_t = p_t * (dp_t - di_row)
  dk = jax.lax.dot_general(ds_t.astype(q.dtype), q, (((1,), (0,)), ((), ())),
                           preferred_element_type=jnp.float32) * scale
  return dk, dv


def dq_step(q, k, v, do, lse_col, di_col, scale, mask):
  """dQ contribution (bq, D) float32 of one (q tile, kv tile) pair. lse_col, di_col: (bq, 1)."""
  s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())),
                          preferred_element_type=jnp.float32) * scale
  p = jnp.exp(s - lse_col)
  if mask is not None:
    p = jnp.where(mask, p, 0.0)
  dp = jax.lax.dot_general(do, v, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
  ds = p * (dp - di_col)
  return jax.lax.dot_general(ds.astype(k.dtype), k, (((1,), (0,)), ((), ())),
                             preferred_element_type=jnp.float32) * scale


def merge(out_a, lse_a, out_b, lse_b):
  """Merges two normalised partials over disjoint key sets.

  out: (B, S, H, D) float32; lse: (B, H, S) float32. Returns (out, lse) over the union.
  """
  lse = jnp.logaddexp(lse_a, lse_b)
  weight = lambda part: jnp.swapaxes(jnp.exp(part - lse), 1, 2)[..., None]
  return out_a * weight(lse_a) + out_b * weight(lse_b), lse
