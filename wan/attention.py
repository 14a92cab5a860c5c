"""The one attention entry point of the models.

Every attention call in `wan/` goes through `attention`; the implementation is chosen by name
(`dot_product` here; Pallas kernels from `kernels/` are routed here too).
"""

import jax
import jax.numpy as jnp


def dot_product(q, k, v, *, q_segment_ids=None, kv_segment_ids=None, precision=None):
  """Plain XLA softmax attention.

  q: (B, Sq, H, D); k, v: (B, Skv, H, D); segment ids: (B, Sq) / (B, Skv) integers, a query
  attends only to keys with the same segment id. Logits and softmax are float32.
  Returns (B, Sq, H, D) in q's dtype.
  """
  scale = q.shape[-1] ** -0.5
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=precision,
                      preferred_element_type=jnp.float32) * scale
  if q_segment_ids is not None or kv_segment_ids is not None:
    if q_segment_ids is None or kv_segment_ids is None:
      raise ValueError("q_segment_ids and kv_segment_ids must be given together")
    mask = q_segment_ids[:, None, :, None] == kv_segment_ids[:, None, None, :]
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1)
  out = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v, precision=precision,
                   preferred_element_type=jnp.float32)
  return out.astype(q.dtype)


def attention(q, k, v, *, impl: str = "dot_product", q_segment_ids=None, kv_segment_ids=None,
              precision=None, block_sizes=None, min_seq_length: int = 0):
  """Attention over (B, S, H, D) tensors with the implementation named by `impl`.

  `block_sizes` (flash block sizes, None = tuned defaults) and `min_seq_length` (below it the
  kernels fall back to dot_product) only matter for the Pallas implementations.
  """
  if impl == "dot_product":
    return dot_product(q, k, v, q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
                       precision=precision)
  raise NotImplementedError(f"attention implementation {impl!r} is not implemented yet; "
                            "use attention='dot_product'")
