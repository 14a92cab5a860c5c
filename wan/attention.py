"""The one attention entry point of the models, routed by name to XLA, Pallas or cuDNN.

`attention(q, k, v, impl=...)` with q (B, Sq, H, D), k/v (B, Skv, H, D):

- dot_product: plain XLA softmax attention; GSPMD shards it from the surrounding constraints.
- flash: the Pallas kernel (kernels.flash_attention). Under a mesh it runs per device in a
  `shard_map`: batch over (data, fsdp), heads over tensor, queries over context (and over fsdp
  when the batch is too small for it). Self-attention's K/V arrive split like the queries and
  are gathered inside (their gradients reduce-scattered); shorter K/V (text, image tokens) are
  given whole to every device.
- ring: context parallelism. Self-attention (K/V as long as the queries) runs
  kernels.ring_attention over the queries' sequence axes (context, and fsdp when the batch is too
  small for it), K/V travelling around the ring; shorter K/V
  (text or image tokens) are gathered once and go through flash (the all-gather strategy).
- cudnn_flash_te: cuDNN flash attention via `jax.nn.dot_product_attention` (NVIDIA GPUs only),
  per device like flash.

Segment ids: a query attends only to keys with the same id (padding masks of the text).
Queries shorter than `min_seq_length` fall back to dot_product for every Pallas/cuDNN route.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

import kernels
from wan import sharding

IMPLS = ("dot_product", "flash", "cudnn_flash_te", "ring")
PALLAS = ("flash", "ring")  # the implementations that run kernels/' Pallas kernels


def runs_kernel(impl: str, seq_len: int, min_seq_length: int) -> bool:
  """Whether `impl` runs its kernel for `seq_len` queries (shorter than `min_seq_length`:
  dot_product, as `attention` routes it)."""
  return impl != "dot_product" and seq_len >= min_seq_length


def dot_product(q, k, v, *, q_segment_ids=None, kv_segment_ids=None, precision=None,
                split_head_dim: bool = True, bias=None, scale: float | None = None):
  """Plain XLA softmax attention.

  q: (B, Sq, H, D); k, v: (B, Skv, H, D); segment ids: (B, Sq) / (B, Skv) integers, a query
  attends only to keys with the same id. bias: added to the logits, broadcastable to
  (B, H, Sq, Skv) (T5's relative positions and padding). scale: of the logits, default
  1/sqrt(D) (T5 uses 1). Logits and softmax are float32. Without a bias it runs heads-major
  with a hand-written backward that recomputes the probabilities (`_softmax_attention`). With
  split_head_dim=False the heads are folded into the batch dimension ((B*H, S, D) matmuls)
  instead of being a separate einsum dimension: same result, another layout for XLA.
  Returns (B, Sq, H, D) in q's dtype.
  """
  if (q_segment_ids is None) != (kv_segment_ids is None):
    raise ValueError("q_segment_ids and kv_segment_ids must be given together")
  if not split_head_dim:
    if bias is not None:
      raise ValueError("split_head_dim=False folds heads into the batch; it takes no bias")
    b, _, h, d = q.shape
    fold = lambda x: jnp.swapaxes(x, 1, 2).reshape(b * h, x.shape[1], 1, d)
    repeat = lambda s: None if s is None else jnp.repeat(s, h, axis=0)
    out = dot_product(fold(q), fold(k), fold(v), q_segment_ids=repeat(q_segment_ids),
                      kv_segment_ids=repeat(kv_segment_ids), precision=precision)
    return jnp.swapaxes(out.reshape(b, h, q.shape[1], d), 1, 2)
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  mask = None
  if q_segment_ids is not None:
    mask = q_segment_ids[:, None, :, None] == kv_segment_ids[:, None, None, :]
  if bias is not None:  # T5: the bias is a function of trained weights; plain autodiff
    q, k, v = _heads_major(q), _heads_major(k), _heads_major(v)
    logits = _logits(q, k, mask, precision) * scale + bias.astype(jnp.float32)
    out = jnp.einsum("bhqk,bhkd->bhqd", jax.nn.softmax(logits, axis=-1).astype(v.dtype), v,
                     precision=precision, preferred_element_type=jnp.float32)
    return _heads_major(out.astype(q.dtype))
  return _softmax_attention(q, k, v, mask, scale, precision)


# Softmax attention with a hand-written backward, as a flash kernel computes it but over whole
# rows. It runs heads-major, (B, H, S, D): the batched matmul XLA runs fastest (on CPU 4x the
# forward of the (B, S, H, D) einsums). Each pass over the (B, H, Sq, Skv) logits costs as much
# as a small matmul, so there are few: the scale is applied inside the exponential (softmax of
# scale * s has the row maximum scale * max(s)), the output is normalised after the
# probabilities' matmul, and the backward recomputes the probabilities in one pass from the
# rows' maxima and sums. The residuals are q, k, v and the output in the caller's (B, S, H, D)
# layout, the arrays the model holds anyway, and those row statistics: autodiff would store the
# probabilities of every layer (a layer-stacked Sq x Skv buffer per head) and read them back.


def _heads_major(x):
  """(B, S, H, D) <-> (B, H, S, D)."""
  return jnp.swapaxes(x, 1, 2)


def _logits(q, k, mask, precision):
  """Unscaled float32 logits (B, H, Sq, Skv) of heads-major q, k; masked ones at the float32
  minimum (a row without any key attends uniformly)."""
  logits = jnp.einsum("bhqd,bhkd->bhqk", q, k, precision=precision,
                      preferred_element_type=jnp.float32)
  if mask is not None:
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  return logits


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _softmax_attention(q, k, v, mask, scale, precision):
  return _softmax_attention_fwd(q, k, v, mask, scale, precision)[0]


def _softmax_attention_fwd(q, k, v, mask, scale, precision):
  logits = _logits(_heads_major(q), _heads_major(k), mask, precision)
  row_max = logits.max(-1, keepdims=True)
  exp = jnp.exp((logits - row_max) * scale)
  row_sum = exp.sum(-1, keepdims=True)
  out = jnp.einsum("bhqk,bhkd->bhqd", exp.astype(v.dtype), _heads_major(v), precision=precision,
                   preferred_element_type=jnp.float32) / row_sum
  out = _heads_major(out.astype(q.dtype))
  return out, (q, k, v, mask, out, row_max, row_sum)


def _softmax_attention_bwd(scale, precision, residuals, d_out):
  q, k, v, mask, out, row_max, row_sum = residuals
  q, k, v, d_o = _heads_major(q), _heads_major(k), _heads_major(v), _heads_major(d_out)
  probs = jnp.exp((_logits(q, k, mask, precision) - row_max) * scale) / row_sum
  d_v = jnp.einsum("bhqk,bhqd->bhkd", probs.astype(d_o.dtype), d_o, precision=precision,
                   preferred_element_type=jnp.float32)
  d_probs = jnp.einsum("bhqd,bhkd->bhqk", d_o, v, precision=precision,
                       preferred_element_type=jnp.float32)
  # softmax': dL/dlogit = p * (dL/dp - sum_k p dL/dp), and sum_k p dL/dp = <dL/dout, out>.
  delta = _heads_major(jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), -1,
                               keepdims=True))
  d_logits = probs * (d_probs - delta)  # of the scaled logits
  if mask is not None:  # masked logits are constants (a row without keys has p = 1 / Skv)
    d_logits = jnp.where(mask, d_logits, 0.0)
  d_q = jnp.einsum("bhqk,bhkd->bhqd", d_logits.astype(k.dtype), k, precision=precision,
                   preferred_element_type=jnp.float32) * scale
  d_k = jnp.einsum("bhqk,bhqd->bhkd", d_logits.astype(q.dtype), q, precision=precision,
                   preferred_element_type=jnp.float32) * scale
  d_mask = None if mask is None else np.zeros(mask.shape, jax.dtypes.float0)
  return (_heads_major(d_q).astype(q.dtype), _heads_major(d_k).astype(k.dtype),
          _heads_major(d_v).astype(v.dtype), d_mask)


_softmax_attention.defvjp(_softmax_attention_fwd, _softmax_attention_bwd)


def _cudnn(q, k, v, q_segment_ids, kv_segment_ids):
  """cuDNN flash attention. Segment ids must be padding masks: every query of a sample has one
  id and the keys with that id come first (the text masks of the model), so they become
  key lengths, which cuDNN masks without materialising a mask."""
  lengths = None
  if kv_segment_ids is not None:
    lengths = jnp.sum(kv_segment_ids == q_segment_ids[:, :1], axis=1, dtype=jnp.int32)
  return jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=lengths,
                                      implementation="cudnn")


def _per_device(fn, q, k, v, q_segment_ids, kv_segment_ids, kv_sharded: bool):
  """Runs fn(q, k, v, q_seg, kv_seg) on each device's shard of the context mesh (or directly).

  Batch over (data, fsdp), heads over tensor, queries over context (and fsdp where the batch
  leaves it), where they divide; K/V are sharded like the queries only when `kv_sharded`, else
  every device receives all of them.
  """
  mesh = sharding.auto_mesh()
  if mesh is None:
    return fn(q, k, v, q_segment_ids, kv_segment_ids)
  kv_axis = "length" if kv_sharded else "kv_length"
  q_spec = sharding.spec(("batch", "length", "act_heads", None), q.shape, mesh)
  kv_spec = sharding.spec(("batch", kv_axis, "act_heads", None), k.shape, mesh)
  if kv_sharded and kv_spec[1] != q_spec[1]:
    raise ValueError(f"ring attention needs queries ({q.shape[1]}) and keys ({k.shape[1]}) "
                     f"split evenly over the same axes ({q_spec[1]})")
  if q_segment_ids is None:
    mapped = jax.shard_map(lambda q, k, v: fn(q, k, v, None, None), mesh=mesh,
                           in_specs=(q_spec, kv_spec, kv_spec), out_specs=q_spec,
                           check_vma=False)
    return mapped(q, k, v)
  seg_specs = (jax.P(*q_spec[:2]), jax.P(*kv_spec[:2]))
  mapped = jax.shard_map(fn, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, *seg_specs),
                         out_specs=q_spec, check_vma=False)
  return mapped(q, k, v, q_segment_ids, kv_segment_ids)


def _length_axes(q) -> tuple[str, ...]:
  """The mesh axes the queries' sequence splits over (context, and fsdp where the batch leaves
  it; sharding.RULES)."""
  mesh = sharding.auto_mesh()
  if mesh is None:
    return ()
  return sharding.axes_of(sharding.spec(("batch", "length", "act_heads", None), q.shape, mesh)[1])


def attention(q, k, v, *, impl: str = "dot_product", q_segment_ids=None, kv_segment_ids=None,
              precision=None, block_sizes=None, min_seq_length: int = 0,
              split_head_dim: bool = True, target=None, kv_split: bool = True):
  """Attention over (B, S, H, D) tensors with the implementation named by `impl` (see IMPLS).

  block_sizes: flash block sizes (BlockSizes, dict, tuple of (name, value) pairs or None for
  the device's tuned entry). min_seq_length: shorter query sequences use dot_product.
  split_head_dim: dot_product layout (see `dot_product`). precision: dot_product matmuls.
  target: the tuning-table key of the devices the kernels compile for (None: this process's).
  kv_split: self-attention's K/V arrive split over the sequence like the queries
  (attention_sharding_uniform); False: whole on every device, which flash then reads as given
  (ring splits them anyway).
  """
  if impl not in IMPLS:
    raise ValueError(f"attention implementation {impl!r} is not one of {list(IMPLS)}")
  if (q_segment_ids is None) != (kv_segment_ids is None):
    raise ValueError("q_segment_ids and kv_segment_ids must be given together")
  if not runs_kernel(impl, q.shape[1], min_seq_length):
    return dot_product(q, k, v, q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
                       precision=precision, split_head_dim=split_head_dim)
  if isinstance(block_sizes, tuple):
    block_sizes = dict(block_sizes)
  flash = functools.partial(_flash_local, block_sizes=block_sizes, target=target)
  if impl == "cudnn_flash_te":
    return _per_device(_cudnn, q, k, v, q_segment_ids, kv_segment_ids, kv_sharded=False)
  axes = _length_axes(q)
  if axes and k.shape[1] == q.shape[1] and (kv_split or impl == "ring"):  # a split sequence
    split = functools.partial(_split_local, block_sizes=block_sizes, target=target,
                              axis_name=axes, strategy="ring" if impl == "ring" else "all_gather")
    return _per_device(split, q, k, v, q_segment_ids, kv_segment_ids, kv_sharded=True)
  return _per_device(flash, q, k, v, q_segment_ids, kv_segment_ids, kv_sharded=False)


def _flash_local(q, k, v, q_segment_ids, kv_segment_ids, *, block_sizes, target):
  return kernels.flash_attention(q, k, v, q_segment_ids=q_segment_ids,
                                 kv_segment_ids=kv_segment_ids, block_sizes=block_sizes,
                                 target=target)


def _split_local(q, k, v, q_segment_ids, kv_segment_ids, *, block_sizes, target, axis_name,
                 strategy):
  """The kernels on this device's queries against K/V split like them: passed around the ring,
  or gathered here (so that the backward reduce-scatters dK/dV rather than all-reducing them
  whole, as it would for K/V that XLA gathered before the shard_map)."""
  return kernels.ring_attention(q, k, v, axis_name=axis_name, q_segment_ids=q_segment_ids,
                                kv_segment_ids=kv_segment_ids, strategy=strategy,
                                block_sizes=block_sizes, target=target)
