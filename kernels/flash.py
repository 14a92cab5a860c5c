"""Flash attention: public API, padding, body dispatch and the custom VJP.

`flash_attention` takes the model layout (B, S, H, D), and so do the kernels: each reads one
head's (block, D) tile straight from it (kernels/tile_math.head_tile), so no activation is
transposed around a call. Each sequence is padded to a multiple of its block and D to what the
body tiles (TPU: a multiple of 128, GPU: a power of two >= 16); padded keys carry a segment id
that no query has, so they are masked out, and padded query rows and head columns are sliced
off. Per-query statistics (lse, di) are heads-major, (B, H, Sq). The backward
recomputes probabilities from the saved log-sum-exp (FA2): a dK/dV kernel and a dQ kernel,
with di = rowsum(o * do) computed in XLA.

Two kernel bodies share this wrapper and kernels/tile_math.py: Mosaic TPU (kernels/flash_tpu.py,
also the CPU interpret-mode default) and Triton GPU (kernels/flash_gpu.py).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from kernels import flash_gpu, flash_tpu, tuning
from kernels.tuning import BlockSizes, block_sizes_for, device_key

# Padding segment ids: a padded key never matches any query id (including a padded query's).
_Q_PAD_ID = jnp.iinfo(jnp.int32).min + 1
_KV_PAD_ID = jnp.iinfo(jnp.int32).min

_BODIES = {"tpu": flash_tpu, "gpu": flash_gpu}

# The checkpoint name of what the backward needs from the forward kernel (out, lse; the flash
# and the ring kernels): a remat policy that saves it never runs a forward kernel again, where
# saving the attention's output alone still does (the lse comes from the same call).
RESIDUALS = "flash_residuals"


@dataclasses.dataclass(frozen=True)
class KernelConfig:
  """Static choices of one flash call (hashable; a custom_vjp non-differentiable argument)."""
  sizes: BlockSizes
  body: str          # "tpu" | "gpu"
  interpret: bool
  scale: float


def resolve(head_dim, *, block_sizes=None, backend=None, interpret=None,
            target=None) -> KernelConfig:
  """Picks the kernel body, interpret mode and block sizes for the devices compiled for.

  target: the tuning-table key of those devices ("v5p", "h100", "cpu", ...; kernels.tuning);
  None: this process's devices. A target lets a CPU process compile for a TPU ahead of time.
  backend: "tpu" | "gpu" | None (None: the target's; CPU runs the TPU body interpreted).
  block_sizes: BlockSizes | dict | None; None takes the tuning-table entry of the target.
  """
  if target is None:
    platform = jax.default_backend()
    platform = "gpu" if platform in ("gpu", "cuda", "rocm") else platform
  else:
    platform = tuning.platform_of(target)
  if backend is None:
    backend = "gpu" if platform == "gpu" else "tpu"
  if backend not in _BODIES:
    raise ValueError(f"backend must be 'tpu' or 'gpu', got {backend!r}")
  if interpret is None:
    interpret = platform == "cpu"
  if block_sizes is None:
    if target is not None:
      key = target
    else:
      key = device_key() if platform != "cpu" else ("cpu" if interpret else backend)
    sizes = block_sizes_for(key)
  else:
    sizes = BlockSizes.make(block_sizes)
  return KernelConfig(sizes, backend, bool(interpret), float(head_dim) ** -0.5)


def _round_up(x, m):
  return -(-x // m) * m


def _clamp(block, length, body, align=128):
  """The tile of a sequence of `length`, no larger than the tuned `block`.

  GPU: a power of 2. TPU: a multiple of `align` (128, or the compute sub-block that must
  divide it) that pads least: an exact divisor of the length where one is at least half the
  tuned block (no padding copy at all), else equal tiles (a padding below `align` instead of
  up to a whole tile: 18,900 queries in tiles of 3072 were padded to 21,504, in 7 of 2816 to
  19,712).
  """
  if body != "tpu":
    return max(16, min(block, pl_next_pow2(length)))
  align = min(align, _round_up(length, 128))
  block = _round_up(block, align)
  tiles = -(-length // block)
  for n in range(tiles, 2 * tiles + 1):
    if length % n == 0 and (length // n) % align == 0:
      return length // n
  return min(block, _round_up(-(-length // tiles), align))


def pl_next_pow2(x):
  return 1 << max(0, (x - 1).bit_length())


def _compute(block, compute):
  compute = min(compute, block)
  return compute if block % compute == 0 else block


def _pad_seq(x, length, axis, value=0):
  extra = length - x.shape[axis]
  if extra == 0:
    return x
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, extra)
  return jnp.pad(x, pad, constant_values=value)


def _seg_ids(q_seg, kv_seg, sq, skv, sq_pad, skv_pad, batch):
  """Padded segment ids, or (None, None) when there is neither user masking nor padding."""
  if q_seg is None and sq == sq_pad and skv == skv_pad:
    return None, None
  if q_seg is None:
    q_seg = jnp.zeros((batch, sq), jnp.int32)
    kv_seg = jnp.zeros((batch, skv), jnp.int32)
  return (_pad_seq(q_seg.astype(jnp.int32), sq_pad, 1, _Q_PAD_ID),
          _pad_seq(kv_seg.astype(jnp.int32), skv_pad, 1, _KV_PAD_ID))


def _pad_head(x, cfg):
  """Zero head columns change nothing (the scale is the unpadded D's). The TPU body reads a
  head as a lane-aligned column block, a multiple of 128 (every Wan model has D = 128); the
  Triton body needs a power of two >= 16."""
  d = x.shape[-1]
  width = _round_up(d, 128) if cfg.body == "tpu" else max(16, pl_next_pow2(d))
  return _pad_seq(x, width, x.ndim - 1)


def block_fwd(q, k, v, q_seg, kv_seg, cfg: KernelConfig, out_dtype=None):
  """One flash forward over all of k/v, any lengths.

  q: (B, Sq, H, D); k, v: (B, Skv, H, D); segment ids (B, Sq) / (B, Skv) or None.
  Returns out (B, Sq, H, D) in out_dtype (default q.dtype) and lse (B, H, Sq) float32.
  """
  body = _BODIES[cfg.body]
  b, sq, _, d = q.shape
  skv = k.shape[1]
  s = cfg.sizes
  bq = _clamp(s.block_q, sq, cfg.body)
  bkv = _clamp(s.block_kv, skv, cfg.body, align=s.block_kv_compute)
  sizes = dataclasses.replace(s, block_q=bq, block_kv=bkv,
                              block_kv_compute=_compute(bkv, s.block_kv_compute))
  sq_pad, skv_pad = _round_up(sq, bq), _round_up(skv, bkv)
  qs, ks = _seg_ids(q_seg, kv_seg, sq, skv, sq_pad, skv_pad, b)
  out, lse = body.fwd(_pad_head(_pad_seq(q, sq_pad, 1), cfg),
                      _pad_head(_pad_seq(k, skv_pad, 1), cfg),
                      _pad_head(_pad_seq(v, skv_pad, 1), cfg), qs, ks, sizes, scale=cfg.scale,
                      out_dtype=out_dtype or q.dtype, interpret=cfg.interpret)
  return out[:, :sq, :, :d], lse[:, :, :sq]


def block_bwd(q, k, v, q_seg, kv_seg, o, lse, do, cfg: KernelConfig):
  """Gradients of one flash block from the (global) lse; all results float32.

  Shapes as in block_fwd; o, do: (B, Sq, H, D); lse: (B, H, Sq). Because p is recomputed with
  the lse of the whole softmax, a call over a subset of keys returns exactly their share.
  """
  body = _BODIES[cfg.body]
  b, sq, _, d = q.shape
  skv = k.shape[1]
  s = cfg.sizes
  di = jnp.swapaxes(jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1), 1, 2)
  do = do.astype(q.dtype)

  def padded(bq, bkv):
    sq_pad, skv_pad = _round_up(sq, bq), _round_up(skv, bkv)
    qs, ks = _seg_ids(q_seg, kv_seg, sq, skv, sq_pad, skv_pad, b)
    pq = lambda x: _pad_head(_pad_seq(x, sq_pad, 1), cfg)
    pk = lambda x: _pad_head(_pad_seq(x, skv_pad, 1), cfg)
    return (pq(q), pk(k), pk(v), qs, ks, pq(do), _pad_seq(lse, sq_pad, 2),
            _pad_seq(di, sq_pad, 2))

  bq = _clamp(s.block_q_dkv, sq, cfg.body)
  bkv = _clamp(s.block_kv_dkv, skv, cfg.body, align=s.block_kv_dkv_compute)
  sizes = dataclasses.replace(s, block_q_dkv=bq, block_kv_dkv=bkv,
                              block_kv_dkv_compute=_compute(bkv, s.block_kv_dkv_compute))
  dk, dv = body.dkv(*padded(bq, bkv), sizes, scale=cfg.scale, interpret=cfg.interpret)
  bq, bkv = _clamp(s.block_q_dq, sq, cfg.body), _clamp(s.block_kv_dq, skv, cfg.body)
  sizes = dataclasses.replace(s, block_q_dq=bq, block_kv_dq=bkv)
  dq = body.dq(*padded(bq, bkv), sizes, scale=cfg.scale, interpret=cfg.interpret)
  return dq[:, :sq, :, :d], dk[:, :skv, :, :d], dv[:, :skv, :, :d]


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _flash(q, k, v, q_seg, kv_seg, cfg):
  return block_fwd(q, k, v, q_seg, kv_seg, cfg)[0]


def _flash_fwd(q, k, v, q_seg, kv_seg, cfg):
  out, lse = block_fwd(q, k, v, q_seg, kv_seg, cfg)
  out, lse = checkpoint_name(out, RESIDUALS), checkpoint_name(lse, RESIDUALS)
  return out, (q, k, v, q_seg, kv_seg, out, lse)


def _flash_bwd(cfg, res, do):
  q, k, v, q_seg, kv_seg, out, lse = res
  dq, dk, dv = block_bwd(q, k, v, q_seg, kv_seg, out, lse, do, cfg)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def check_inputs(q, k, v, q_segment_ids, kv_segment_ids):
  """Raises a ValueError naming the problem for inputs that are not (B, S, H, D) attention."""
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(f"q, k, v must be (B, S, H, D); got ranks {q.ndim}, {k.ndim}, {v.ndim} "
                     "(merge or split heads before calling)")
  if k.shape != v.shape:
    raise ValueError(f"k and v shapes differ: {k.shape} vs {v.shape}")
  if q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
    raise ValueError(f"q {q.shape} and k {k.shape} must share batch, heads and head dim "
                     "(layout (B, S, H, D); repeat kv heads for grouped attention)")
  if (q_segment_ids is None) != (kv_segment_ids is None):
    raise ValueError("q_segment_ids and kv_segment_ids must be given together")
  if q_segment_ids is not None:
    if q_segment_ids.shape != q.shape[:2] or kv_segment_ids.shape != k.shape[:2]:
      raise ValueError(f"segment ids must be (B, Sq) {q.shape[:2]} and (B, Skv) {k.shape[:2]}; "
                       f"got {q_segment_ids.shape} and {kv_segment_ids.shape}")
    if not (jnp.issubdtype(q_segment_ids.dtype, jnp.integer)
            and jnp.issubdtype(kv_segment_ids.dtype, jnp.integer)):
      raise ValueError("segment ids must be integer arrays")
  if q.shape[-1] > 256:
    raise ValueError(f"head dim {q.shape[-1]} is too large for the flash kernels (max 256); "
                     "use impl='dot_product'")


def flash_attention(q, k, v, *, q_segment_ids=None, kv_segment_ids=None, block_sizes=None,
                    interpret=None, backend=None, target=None):
  """Softmax attention with scale 1/sqrt(D), computed blockwise in Pallas.

  q: (B, Sq, H, D); k, v: (B, Skv, H, D); segment ids: (B, Sq) / (B, Skv) integers (a query
  attends to keys with an equal id; use them for padded text or packed sequences).
  block_sizes: BlockSizes | dict | None (the device's tuning-table entry).
  interpret: None = interpret mode on CPU. backend: "tpu" | "gpu" | None (by platform).
  target: the tuning-table key of the devices compiled for (None: this process's; `resolve`).
  Returns (B, Sq, H, D) in q's dtype; float32 accumulation throughout.
  """
  check_inputs(q, k, v, q_segment_ids, kv_segment_ids)
  cfg = resolve(q.shape[-1], block_sizes=block_sizes, backend=backend, interpret=interpret,
                target=target)
  return _flash(q, k, v, q_segment_ids, kv_segment_ids, cfg)
