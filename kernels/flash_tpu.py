"""Mosaic TPU kernel bodies: forward, dK/dV and dQ over a grid with a reduction axis.

Layout: the model's, q (B, Sq, H, D) and k/v (B, Skv, H, D), sequences already padded to block
multiples and D to a multiple of 128 by the caller (kernels/flash.py). Each kernel views them as
(B, S, H·D), free, and reads one head's (block, D) tile as the column block `head` of a row
block, so no (B, H, S, D) transposes are needed around the kernels. The per-query statistics
(lse, di) are heads-major, (B, H, Sq). The reduction axis is the last grid axis ("arbitrary");
the running statistics and accumulators live in VMEM scratch across it. Segment ids arrive as
q (B, Sq, 1) / kv (B, 1, Skv) for the forward and dQ kernels and transposed, kv (B, Skv, 1) /
q (B, 1, Sq), for the dK/dV kernel, so each mask is a broadcast compare with no relayout.
"""

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels import tile_math

_PARALLEL3_ARBITRARY = ("parallel", "parallel", "parallel", "arbitrary")


def _params(sizes):
  return pltpu.CompilerParams(dimension_semantics=_PARALLEL3_ARBITRARY,
                              vmem_limit_bytes=sizes.vmem_limit_bytes)


def _nbytes(x) -> int:
  return math.prod(x.shape) * jnp.dtype(x.dtype).itemsize


def _cost(q, skv, matmuls, reads, writes):
  """The kernel's work for XLA's cost model, which otherwise sees a Pallas call as free (its
  scheduler overlaps collectives by these numbers; benchmarks/hlo_audit.py reads them):
  `matmuls` (Sq x Skv x D) products per head of 2 flops a term, one exponential per score,
  and the HBM bytes of `reads` ((array, times the grid reads it)) and `writes`. Segment ids
  are left out (4 bytes a token against D x 2 for each of q, k, v)."""
  b, sq, h, d = q.shape
  return pl.CostEstimate(flops=2 * matmuls * b * h * sq * skv * d,
                         transcendentals=b * h * sq * skv,
                         bytes_accessed=sum(_nbytes(x) * n for x, n in reads)
                         + sum(map(_nbytes, writes)))


def _fwd_kernel(*refs, scale, block_kv_compute, has_seg):
  if has_seg:
    q_seg_ref, kv_seg_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, m_sc, l_sc, acc_sc = refs
  else:
    q_ref, k_ref, v_ref, o_ref, lse_ref, m_sc, l_sc, acc_sc = refs
  kv_step = pl.program_id(3)

  @pl.when(kv_step == 0)
  def _init():
    m_sc[...] = jnp.full(m_sc.shape, tile_math.MASK_VALUE, jnp.float32)
    l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
    acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

  q = q_ref[...]

  def body(c, carry):
    start = pl.multiple_of(c * block_kv_compute, block_kv_compute)
    k = k_ref[pl.ds(start, block_kv_compute), :]
    v = v_ref[pl.ds(start, block_kv_compute), :]
    mask = (q_seg_ref[...] == kv_seg_ref[:, pl.ds(start, block_kv_compute)]) if has_seg else None
    s = tile_math.scores(q, k, scale, mask)
    m, l, acc = tile_math.online_softmax_step(m_sc[...], l_sc[...], acc_sc[...], s, v, mask)
    m_sc[...], l_sc[...], acc_sc[...] = m, l, acc
    return carry

  jax.lax.fori_loop(0, k_ref.shape[0] // block_kv_compute, body, 0)

  @pl.when(kv_step == pl.num_programs(3) - 1)
  def _done():
    out, lse = tile_math.finalize(m_sc[...], l_sc[...], acc_sc[...])
    o_ref[...] = out.astype(o_ref.dtype)
    lse_ref[...] = lse


def fwd(q, k, v, q_seg, kv_seg, sizes, *, scale, out_dtype, interpret):
  """-> out (B, Sq, H, D) out_dtype, lse (B, H, Sq) float32. Blocks must divide the lengths."""
  b, sq, h, d = q.shape
  skv = k.shape[1]
  bq, bkv, bkvc = sizes.block_q, sizes.block_kv, sizes.block_kv_compute
  has_seg = q_seg is not None
  q_spec = tile_math.head_tile(bq, d, lambda bi, hi, i, j: (bi, i, hi))
  kv_spec = tile_math.head_tile(bkv, d, lambda bi, hi, i, j: (bi, j, hi))
  in_specs = [q_spec, kv_spec, kv_spec]
  args = list(map(tile_math.tokens, (q, k, v)))
  if has_seg:
    in_specs = [pl.BlockSpec((None, bq, 1), lambda bi, hi, i, j: (bi, i, 0)),
                pl.BlockSpec((None, 1, bkv), lambda bi, hi, i, j: (bi, 0, j))] + in_specs
    args = [q_seg[:, :, None], kv_seg[:, None, :]] + args
  out_shape = [jax.ShapeDtypeStruct((b, sq, h * d), out_dtype),
               jax.ShapeDtypeStruct((b, h, sq, 1), jnp.float32)]
  out, lse = pl.pallas_call(
      functools.partial(_fwd_kernel, scale=scale, block_kv_compute=bkvc, has_seg=has_seg),
      grid=(b, h, sq // bq, skv // bkv),
      in_specs=in_specs,
      out_specs=[q_spec, pl.BlockSpec((None, None, bq, 1), lambda bi, hi, i, j: (bi, hi, i, 0))],
      out_shape=out_shape,
      cost_estimate=_cost(q, skv, 2, [(q, 1), (k, sq // bq), (v, sq // bq)], out_shape),
      scratch_shapes=[pltpu.VMEM((bq, 1), jnp.float32), pltpu.VMEM((bq, 1), jnp.float32),
                      pltpu.VMEM((bq, d), jnp.float32)],
      compiler_params=_params(sizes),
      interpret=interpret,
      name="flash_fwd",
  )(*args)
  return out.reshape(q.shape), lse[..., 0]


def _dkv_kernel(*refs, scale, block_kv_compute, has_seg):
  if has_seg:
    (kv_seg_ref, q_seg_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref,
     dk_ref, dv_ref, dk_sc, dv_sc) = refs
  else:
    q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, dk_ref, dv_ref, dk_sc, dv_sc = refs
  q_step = pl.program_id(3)

  @pl.when(q_step == 0)
  def _init():
    dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
    dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

  q, do, lse, di = q_ref[...], do_ref[...], lse_ref[...], di_ref[...]

  def body(c, carry):
    rows = pl.ds(pl.multiple_of(c * block_kv_compute, block_kv_compute), block_kv_compute)
    mask_t = (kv_seg_ref[rows, :] == q_seg_ref[...]) if has_seg else None
    dk, dv = tile_math.dkv_step(q, k_ref[rows, :], v_ref[rows, :], do, lse, di, scale, mask_t)
    dk_sc[rows, :] += dk
    dv_sc[rows, :] += dv
    return carry

  jax.lax.fori_loop(0, k_ref.shape[0] // block_kv_compute, body, 0)

  @pl.when(q_step == pl.num_programs(3) - 1)
  def _done():
    dk_ref[...] = dk_sc[...]
    dv_ref[...] = dv_sc[...]


def _dq_kernel(*refs, scale, has_seg):
  if has_seg:
    q_seg_ref, kv_seg_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, dq_ref, dq_sc = refs
  else:
    q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, dq_ref, dq_sc = refs
  kv_step = pl.program_id(3)

  @pl.when(kv_step == 0)
  def _init():
    dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)

  mask = (q_seg_ref[...] == kv_seg_ref[...]) if has_seg else None
  dq_sc[...] += tile_math.dq_step(q_ref[...], k_ref[...], v_ref[...], do_ref[...], lse_ref[...],
                                  di_ref[...], scale, mask)

  @pl.when(kv_step == pl.num_programs(3) - 1)
  def _done():
    dq_ref[...] = dq_sc[...]


def dkv(q, k, v, q_seg, kv_seg, do, lse, di, sizes, *, scale, interpret):
  """-> dk, dv (B, Skv, H, D) float32. lse, di: (B, H, Sq) float32."""
  b, sq, h, d = q.shape
  skv = k.shape[1]
  has_seg = q_seg is not None
  f32 = jnp.float32
  # dK/dV: grid (b, h, kv tile, q tile); per-query statistics as rows (1, bq).
  bq, bkv, bkvc = sizes.block_q_dkv, sizes.block_kv_dkv, sizes.block_kv_dkv_compute
  q_spec = tile_math.head_tile(bq, d, lambda bi, hi, j, i: (bi, i, hi))
  kv_spec = tile_math.head_tile(bkv, d, lambda bi, hi, j, i: (bi, j, hi))
  row_spec = pl.BlockSpec((None, None, 1, bq), lambda bi, hi, j, i: (bi, hi, 0, i))
  in_specs = [q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec]
  args = [*map(tile_math.tokens, (q, k, v, do)), lse[:, :, None, :], di[:, :, None, :]]
  if has_seg:
    in_specs = [pl.BlockSpec((None, bkv, 1), lambda bi, hi, j, i: (bi, j, 0)),
                pl.BlockSpec((None, 1, bq), lambda bi, hi, j, i: (bi, 0, i))] + in_specs
    args = [kv_seg[:, :, None], q_seg[:, None, :]] + args
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, scale=scale, block_kv_compute=bkvc, has_seg=has_seg),
      grid=(b, h, skv // bkv, sq // bq),
      in_specs=in_specs,
      out_specs=[kv_spec, kv_spec],
      out_shape=[jax.ShapeDtypeStruct((b, skv, h * d), f32)] * 2,
      cost_estimate=_cost(q, skv, 4,
                          [(k, 1), (v, 1)] + [(x, skv // bkv) for x in (q, do, lse, di)],
                          [jax.ShapeDtypeStruct(k.shape, f32)] * 2),
      scratch_shapes=[pltpu.VMEM((bkv, d), f32), pltpu.VMEM((bkv, d), f32)],
      compiler_params=_params(sizes),
      interpret=interpret,
      name="flash_dkv",
  )(*args)
  return dk.reshape(k.shape), dv.reshape(v.shape)


def dq(q, k, v, q_seg, kv_seg, do, lse, di, sizes, *, scale, interpret):
  """-> dq (B, Sq, H, D) float32. lse, di: (B, H, Sq) float32."""
  b, sq, h, d = q.shape
  skv = k.shape[1]
  has_seg = q_seg is not None
  f32 = jnp.float32
  # dQ: grid (b, h, q tile, kv tile); per-query statistics as columns (bq, 1).
  bq, bkv = sizes.block_q_dq, sizes.block_kv_dq
  q_spec = tile_math.head_tile(bq, d, lambda bi, hi, i, j: (bi, i, hi))
  kv_spec = tile_math.head_tile(bkv, d, lambda bi, hi, i, j: (bi, j, hi))
  col_spec = pl.BlockSpec((None, None, bq, 1), lambda bi, hi, i, j: (bi, hi, i, 0))
  in_specs = [q_spec, kv_spec, kv_spec, q_spec, col_spec, col_spec]
  args = [*map(tile_math.tokens, (q, k, v, do)), lse[..., None], di[..., None]]
  if has_seg:
    in_specs = [pl.BlockSpec((None, bq, 1), lambda bi, hi, i, j: (bi, i, 0)),
                pl.BlockSpec((None, 1, bkv), lambda bi, hi, i, j: (bi, 0, j))] + in_specs
    args = [q_seg[:, :, None], kv_seg[:, None, :]] + args
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, scale=scale, has_seg=has_seg),
      grid=(b, h, sq // bq, skv // bkv),
      in_specs=in_specs,
      out_specs=q_spec,
      out_shape=jax.ShapeDtypeStruct((b, sq, h * d), f32),
      cost_estimate=_cost(q, skv, 3, [(q, 1), (do, 1), (lse, 1), (di, 1), (k, sq // bq),
                                      (v, sq // bq)], [jax.ShapeDtypeStruct(q.shape, f32)]),
      scratch_shapes=[pltpu.VMEM((bq, d), f32)],
      compiler_params=_params(sizes),
      interpret=interpret,
      name="flash_dq",
  )(*args)
  return dq.reshape(q.shape)
