"""Context-parallel attention over a named mesh axis, built from the flash block functions.

Call inside `jax.shard_map` (check_vma=False: the interpreted Pallas kernels do not carry
varying-axis types) with the sequence dimension of q, k, v sharded over `axis_name`.

strategy="ring": K/V (with their segment ids) travel around the ring with `ppermute`; each hop
is issued before the block compute so the transfer overlaps it, and the useless last hop is
skipped. Per-hop partials (out, lse) merge with the lse trick. The backward recomputes each
block with the global lse, so a hop's (dq, dk, dv) is exactly its share; dK/dV accumulators
travel with the K/V they belong to and arrive home after n hops.

strategy="all_gather": K/V are gathered over the axis once and one flash call runs locally
(autodiff turns the gather into a reduce-scatter of dK/dV). Cheaper for short K/V
(cross-attention) and small rings.
"""

import functools

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from kernels import tile_math
from kernels.flash import (RESIDUALS, _flash, _pad_seq, _round_up, _seg_ids, block_bwd,
                           block_fwd, check_inputs, resolve)


def _ring_perm(n):
  return [(i, (i + 1) % n) for i in range(n)]


def _rotate(x, axis_name, n):
  # ppermute takes several axes in the mesh's order (jax >= 0.11 refuses any other); the ring
  # visits every shard whichever order it runs in, so the token order of `axis_name` is moot.
  if isinstance(axis_name, (tuple, list)):
    axis_name = tuple(a for a in jax.sharding.get_abstract_mesh().axis_names if a in axis_name)
  return jax.lax.ppermute(x, axis_name, _ring_perm(n))


def _ring_fwd_pass(q, k, v, q_seg, kv_seg, cfg, axis_name):
  n = jax.lax.axis_size(axis_name)
  out = lse = None
  held = (k, v, kv_seg)
  for hop in range(n):
    incoming = _rotate(held, axis_name, n) if hop < n - 1 else None  # before compute: overlap
    o_hop, lse_hop = block_fwd(q, held[0], held[1], q_seg, held[2], cfg, out_dtype=jnp.float32)
    out, lse = (o_hop, lse_hop) if out is None else tile_math.merge(out, lse, o_hop, lse_hop)
    held = incoming
  return out, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _ring(q, k, v, q_seg, kv_seg, cfg, axis_name):
  return _ring_fwd_pass(q, k, v, q_seg, kv_seg, cfg, axis_name)[0].astype(q.dtype)


def _ring_fwd(q, k, v, q_seg, kv_seg, cfg, axis_name):
  out, lse = _ring_fwd_pass(q, k, v, q_seg, kv_seg, cfg, axis_name)
  # The output in q's dtype is also the residual (as the flash kernel's): no float32 copy.
  out = checkpoint_name(out.astype(q.dtype), RESIDUALS)
  lse = checkpoint_name(lse, RESIDUALS)
  return out, (q, k, v, q_seg, kv_seg, out, lse)


def _ring_bwd(cfg, axis_name, res, do):
  q, k, v, q_seg, kv_seg, out, lse = res
  n = jax.lax.axis_size(axis_name)
  dq = dk = dv = None
  held = (k, v, kv_seg)
  for hop in range(n):
    incoming = _rotate(held, axis_name, n) if hop < n - 1 else None
    dq_hop, dk_hop, dv_hop = block_bwd(q, held[0], held[1], q_seg, held[2], out, lse, do, cfg)
    dq = dq_hop if dq is None else dq + dq_hop
    dk = dk_hop if dk is None else dk + dk_hop
    dv = dv_hop if dv is None else dv + dv_hop
    # The accumulators follow the K/V shard they belong to; after the n-th hop they are home.
    dk, dv = _rotate((dk, dv), axis_name, n)
    held = incoming
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None


_ring.defvjp(_ring_fwd, _ring_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _gather_padded(x, length, padded, axis_name):
  """x (B, length, ...) padded to `padded` along the sequence, then gathered over the axis."""
  return jax.lax.all_gather(_pad_seq(x, padded, 1), axis_name, axis=1, tiled=True)


def _gather_padded_fwd(x, length, padded, axis_name):
  return _gather_padded(x, length, padded, axis_name), None


def _gather_padded_bwd(length, padded, axis_name, _, g):
  local = jax.lax.psum_scatter(g, axis_name, scatter_dimension=1, tiled=True)
  # The barrier keeps XLA from folding the slice into the reduce-scatter, which it otherwise
  # rewrites as an all-reduce of the whole gradient (twice the bytes) and a dynamic slice.
  return (jax.lax.optimization_barrier(local)[:, :length],)


_gather_padded.defvjp(_gather_padded_fwd, _gather_padded_bwd)


def ring_attention(q, k, v, *, axis_name, q_segment_ids=None, kv_segment_ids=None,
                   strategy: str = "ring", block_sizes=None, interpret=None, backend=None,
                   target=None):
  """Attention of local queries against keys sharded over `axis_name` (inside shard_map).

  q: (B, Sq_local, H, D); k, v: (B, Skv_local, H, D); segment ids (B, Sq_local) /
  (B, Skv_local), each device holding its own sequence shard (shard i = positions
  i*S_local ... (i+1)*S_local - 1). strategy: "ring" | "all_gather". Other arguments as in
  `flash_attention`. Returns (B, Sq_local, H, D) in q's dtype.
  """
  check_inputs(q, k, v, q_segment_ids, kv_segment_ids)
  cfg = resolve(q.shape[-1], block_sizes=block_sizes, backend=backend, interpret=interpret,
                target=target)
  # Each shard pads its keys to whole 128-token tiles once, here: padded after the gather (or
  # at every hop), the whole K/V would be copied (twice per layer and direction for a 14B
  # model's 720p video on v5p-8: a fifth of the layer's cycles in XLA's cost model).
  b, sq = q.shape[:2]
  length = k.shape[1]
  padded = _round_up(length, 128)
  q_segment_ids, kv_segment_ids = _seg_ids(q_segment_ids, kv_segment_ids, sq, length, sq,
                                           padded, b)
  if strategy == "all_gather":
    gather = lambda x: _gather_padded(x, length, padded, axis_name)
    kv_segment_ids = None if kv_segment_ids is None else jax.lax.all_gather(
        kv_segment_ids, axis_name, axis=1, tiled=True)
    return _flash(q, gather(k), gather(v), q_segment_ids, kv_segment_ids, cfg)
  if strategy == "ring":
    k, v = _pad_seq(k, padded, 1), _pad_seq(v, padded, 1)
    return _ring(q, k, v, q_segment_ids, kv_segment_ids, cfg, axis_name)
  raise ValueError(f"strategy must be 'ring' or 'all_gather', got {strategy!r}")
