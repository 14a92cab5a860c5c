"""Triton (Pallas GPU) kernel bodies: forward, dK/dV and dQ with the reduction loop inside.

Triton has no scratch memory that persists across grid steps, so unlike the TPU body the
reduction runs as a `fori_loop` in the kernel with (m, l, acc) / (dk, dv) / dq as loop carries,
over the whole other sequence held as one block. Same layout (the model's (B, S, H, D), viewed
as (B, S, H·D) with one head's tile as a column block), padding and math as the TPU body
(kernels/flash_tpu.py, kernels/tile_math.py). The Triton backend is deprecated from jax 0.11
but present; a Mosaic GPU body would replace this one.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from kernels import tile_math


def _params(sizes, head_dim):
  warps = sizes.num_warps or (4 if head_dim <= 64 else 8)
  return pltriton.CompilerParams(num_warps=warps, num_stages=sizes.num_stages or 2)


def _fwd_kernel(*refs, scale, block_kv, has_seg):
  if has_seg:
    q_seg_ref, kv_seg_ref, q_ref, k_ref, v_ref, o_ref, lse_ref = refs
  else:
    q_ref, k_ref, v_ref, o_ref, lse_ref = refs
  q = q_ref[...]
  bq, d = q.shape

  def body(j, carry):
    rows = pl.ds(j * block_kv, block_kv)
    mask = (q_seg_ref[...][:, None] == kv_seg_ref[rows][None, :]) if has_seg else None
    s = tile_math.scores(q, k_ref[rows, :], scale, mask)
    return tile_math.online_softmax_step(*carry, s, v_ref[rows, :], mask)

  init = (jnp.full((bq, 1), tile_math.MASK_VALUE, jnp.float32), jnp.zeros((bq, 1), jnp.float32),
          jnp.zeros((bq, d), jnp.float32))
  m, l, acc = jax.lax.fori_loop(0, k_ref.shape[0] // block_kv, body, init)
  out, lse = tile_math.finalize(m, l, acc)
  o_ref[...] = out.astype(o_ref.dtype)
  lse_ref[...] = lse[:, 0]


def fwd(q, k, v, q_seg, kv_seg, sizes, *, scale, out_dtype, interpret):
  """-> out (B, Sq, H, D) out_dtype, lse (B, H, Sq) float32. Blocks must divide the lengths."""
  b, sq, h, d = q.shape
  skv = k.shape[1]
  bq, bkv = sizes.block_q, sizes.block_kv
  has_seg = q_seg is not None
  q_spec = tile_math.head_tile(bq, d, lambda bi, hi, i: (bi, i, hi))
  kv_spec = tile_math.head_tile(skv, d, lambda bi, hi, i: (bi, 0, hi))
  in_specs = [q_spec, kv_spec, kv_spec]
  args = list(map(tile_math.tokens, (q, k, v)))
  if has_seg:
    in_specs = [pl.BlockSpec((None, bq), lambda bi, hi, i: (bi, i)),
                pl.BlockSpec((None, skv), lambda bi, hi, i: (bi, 0))] + in_specs
    args = [q_seg, kv_seg] + args
  out, lse = pl.pallas_call(
      functools.partial(_fwd_kernel, scale=scale, block_kv=bkv, has_seg=has_seg),
      grid=(b, h, sq // bq),
      in_specs=in_specs,
      out_specs=[q_spec, pl.BlockSpec((None, None, bq), lambda bi, hi, i: (bi, hi, i))],
      out_shape=[jax.ShapeDtypeStruct((b, sq, h * d), out_dtype),
                 jax.ShapeDtypeStruct((b, h, sq), jnp.float32)],
      compiler_params=_params(sizes, d),
      interpret=interpret,
      name="flash_fwd_triton",
  )(*args)
  return out.reshape(q.shape), lse


def _dkv_kernel(*refs, scale, block_q, has_seg):
  if has_seg:
    kv_seg_ref, q_seg_ref, k_ref, v_ref, q_ref, do_ref, lse_ref, di_ref, dk_ref, dv_ref = refs
  else:
    k_ref, v_ref, q_ref, do_ref, lse_ref, di_ref, dk_ref, dv_ref = refs
  k, v = k_ref[...], v_ref[...]

  def body(i, carry):
    rows = pl.ds(i * block_q, block_q)
    mask_t = (kv_seg_ref[...][:, None] == q_seg_ref[rows][None, :]) if has_seg else None
    dk, dv = tile_math.dkv_step(q_ref[rows, :], k, v, do_ref[rows, :], lse_ref[rows][None, :],
                                di_ref[rows][None, :], scale, mask_t)
    return carry[0] + dk, carry[1] + dv

  zeros = jnp.zeros(k.shape, jnp.float32)
  dk, dv = jax.lax.fori_loop(0, q_ref.shape[0] // block_q, body, (zeros, zeros))
  dk_ref[...] = dk
  dv_ref[...] = dv


def dkv(q, k, v, q_seg, kv_seg, do, lse, di, sizes, *, scale, interpret):
  """-> dk, dv (B, Skv, H, D) float32. lse, di: (B, H, Sq) float32."""
  b, sq, h, d = q.shape
  skv = k.shape[1]
  bq, bkv = sizes.block_q_dkv, sizes.block_kv_dkv
  has_seg = q_seg is not None
  kv_spec = tile_math.head_tile(bkv, d, lambda bi, hi, j: (bi, j, hi))
  q_spec = tile_math.head_tile(sq, d, lambda bi, hi, j: (bi, 0, hi))
  row_spec = pl.BlockSpec((None, None, sq), lambda bi, hi, j: (bi, hi, 0))
  in_specs = [kv_spec, kv_spec, q_spec, q_spec, row_spec, row_spec]
  args = [*map(tile_math.tokens, (k, v, q, do)), lse, di]
  if has_seg:
    in_specs = [pl.BlockSpec((None, bkv), lambda bi, hi, j: (bi, j)),
                pl.BlockSpec((None, sq), lambda bi, hi, j: (bi, 0))] + in_specs
    args = [kv_seg, q_seg] + args
  f32 = jnp.float32
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, scale=scale, block_q=bq, has_seg=has_seg),
      grid=(b, h, skv // bkv),
      in_specs=in_specs,
      out_specs=[kv_spec, kv_spec],
      out_shape=[jax.ShapeDtypeStruct((b, skv, h * d), f32)] * 2,
      compiler_params=_params(sizes, d),
      interpret=interpret,
      name="flash_dkv_triton",
  )(*args)
  return dk.reshape(k.shape), dv.reshape(v.shape)


def _dq_kernel(*refs, scale, block_kv, has_seg):
  if has_seg:
    q_seg_ref, kv_seg_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, dq_ref = refs
  else:
    q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, dq_ref = refs
  q, do = q_ref[...], do_ref[...]
  lse, di = lse_ref[...][:, None], di_ref[...][:, None]

  def body(j, dq):
    rows = pl.ds(j * block_kv, block_kv)
    mask = (q_seg_ref[...][:, None] == kv_seg_ref[rows][None, :]) if has_seg else None
    return dq + tile_math.dq_step(q, k_ref[rows, :], v_ref[rows, :], do, lse, di, scale, mask)

  dq_ref[...] = jax.lax.fori_loop(0, k_ref.shape[0] // block_kv, body,
                                  jnp.zeros(q.shape, jnp.float32))


def dq(q, k, v, q_seg, kv_seg, do, lse, di, sizes, *, scale, interpret):
  """-> dq (B, Sq, H, D) float32. lse, di: (B, H, Sq) float32."""
  b, sq, h, d = q.shape
  skv = k.shape[1]
  bq, bkv = sizes.block_q_dq, sizes.block_kv_dq
  has_seg = q_seg is not None
  q_spec = tile_math.head_tile(bq, d, lambda bi, hi, i: (bi, i, hi))
  kv_spec = tile_math.head_tile(skv, d, lambda bi, hi, i: (bi, 0, hi))
  row_spec = pl.BlockSpec((None, None, bq), lambda bi, hi, i: (bi, hi, i))
  in_specs = [q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec]
  args = [*map(tile_math.tokens, (q, k, v, do)), lse, di]
  if has_seg:
    in_specs = [pl.BlockSpec((None, bq), lambda bi, hi, i: (bi, i)),
                pl.BlockSpec((None, skv), lambda bi, hi, i: (bi, 0))] + in_specs
    args = [q_seg, kv_seg] + args
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, scale=scale, block_kv=bkv, has_seg=has_seg),
      grid=(b, h, sq // bq),
      in_specs=in_specs,
      out_specs=q_spec,
      out_shape=jax.ShapeDtypeStruct((b, sq, h * d), jnp.float32),
      compiler_params=_params(sizes, d),
      interpret=interpret,
      name="flash_dq_triton",
  )(*args)
  return dq.reshape(q.shape)
