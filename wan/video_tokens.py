"""Latent video <-> transformer tokens: non-overlapping patches in one order, and each token's 3D
RoPE position and rotation. Shared by the transformer (`forward`, `forward_packed`) and the
host-side packer (wan/data/packing.py).

Array methods only in patchify / unpatchify / grid_positions, so NumPy input stays NumPy.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np


def check_video_size(height: int, width: int, num_frames: int, spatial: int, temporal: int,
                     patch_size):
  """Pixel sizes that the VAE (spatial x, temporal x) and the (pt, ph, pw) patches divide;
  raises ValueError saying what to use."""
  _, ph, pw = patch_size
  for name, size, patch in (("height", height, ph), ("width", width, pw)):
    factor = spatial * patch
    if size < factor or size % factor:
      raise ValueError(f"{name}={size} must be a multiple of {factor} (VAE {spatial}x times "
                       f"patch {patch}); use {max(factor, size // factor * factor)}")
  if num_frames < 1 or (num_frames - 1) % temporal:
    k = max(num_frames - 1, 0) // temporal
    raise ValueError(f"num_frames={num_frames} must be {temporal}k+1; use {temporal * k + 1} "
                     f"or {temporal * k + temporal + 1}")


def patchify(latents, patch_size):
  """Non-overlapping (pt, ph, pw) patches, each flattened in (pt, ph, pw, C) order, frame-major.

  latents: (..., F, H, W, C) -> tokens (..., S, pt * ph * pw * C), S = F/pt * H/ph * W/pw.
  Array methods only, so NumPy arrays stay NumPy (the host-side packer, wan/data/packing.py,
  uses this same function).
  """
  *lead, f, h, w, c = latents.shape
  pt, ph, pw = patch_size
  grid = (f // pt, h // ph, w // pw)
  n = len(lead)
  x = latents.reshape(*lead, grid[0], pt, grid[1], ph, grid[2], pw, c)
  x = x.transpose(*range(n), n, n + 2, n + 4, n + 1, n + 3, n + 5, n + 6)
  return x.reshape(*lead, math.prod(grid), pt * ph * pw * c)


def unpatchify(tokens, grid, patch_size, channels: int):
  """Inverse of `patchify`: (..., S, pt * ph * pw * channels) -> (..., F, H, W, channels).

  grid: (F/pt, H/ph, W/pw), the token grid.
  """
  *lead, _, _ = tokens.shape
  pt, ph, pw = patch_size
  n = len(lead)
  x = tokens.reshape(*lead, *grid, pt, ph, pw, channels)
  x = x.transpose(*range(n), n, n + 3, n + 1, n + 4, n + 2, n + 5, n + 6)
  return x.reshape(*lead, grid[0] * pt, grid[1] * ph, grid[2] * pw, channels)


def grid_positions(grid) -> np.ndarray:
  """(frame, row, column) of each token of an (f, h, w) token grid, in patchify's order.

  Returns (f * h * w, 3) int32 NumPy.
  """
  axes = np.meshgrid(*(np.arange(n, dtype=np.int32) for n in grid), indexing="ij")
  return np.stack(axes, axis=-1).reshape(-1, 3)


@functools.cache
def rope_tables(cfg):
  """cfg: a transformer Config (attention_head_dim, rope_max_seq_len).

  3D RoPE cos/sin per axis position: ((cos, sin) of frames, of rows, of columns), NumPy float32.

  Each is (rope_max_seq_len, part // 2): the head dim is split into frame / height / width parts
  (h = w = 2 * (head_dim // 6), the rest for frames) and each part rotates its pairs by
  position * theta^(-2i/part). Computed in float64, like the reference.
  """
  head_dim = cfg.attention_head_dim
  hw_dim = 2 * (head_dim // 6)
  tables = []
  for part in (head_dim - 2 * hw_dim, hw_dim, hw_dim):
    inv = 1.0 / (10000.0 ** (np.arange(0, part, 2, dtype=np.float64) / part))
    angles = np.outer(np.arange(cfg.rope_max_seq_len, dtype=np.float64), inv)
    tables.append((np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)))
  return tuple(tables)


def rope_cos_sin(cfg, positions):
  """cos, sin per token and head-dim channel, gathered from `rope_tables` by grid position.

  positions: (..., S, 3) integer (frame, row, column) -> cos, sin (..., S, head_dim) float32,
  in the form `apply_rope` reads: channels 2i and 2i+1 rotate as a pair by one angle, whose
  cos and sin each appear twice. A position at or past rope_max_seq_len gives NaN (jnp.take's
  fill), never a silently clamped angle.
  """
  tables = rope_tables(cfg)
  return tuple(jnp.repeat(jnp.concatenate([jnp.take(t[i], positions[..., axis], axis=0)
                                           for axis, t in enumerate(tables)], axis=-1), 2, -1)
               for i in (0, 1))


@functools.cache
def _pair_rotation(dim: int) -> np.ndarray:
  """(dim, dim) R with (x @ R)[2i] = -x[2i+1] and (x @ R)[2i+1] = x[2i]."""
  r = np.zeros((dim, dim), np.float32)
  r[1::2, 0::2] = -np.eye(dim // 2, dtype=np.float32)
  r[0::2, 1::2] = np.eye(dim // 2, dtype=np.float32)
  return r


def apply_rope(x, cos, sin):
  """Rotates consecutive pairs (x[2i], x[2i+1]). x: (B, S, H, Dh); cos, sin: (S or B, S, Dh)
  from rope_cos_sin.

  out[2i] = x[2i] cos - x[2i+1] sin, out[2i+1] = x[2i+1] cos + x[2i] sin: x * cos plus
  (x @ R) * sin, R the signed pair swap. The swap as a matmul keeps the head dim whole and
  minor (a product with one nonzero term per output, exact at HIGHEST precision, and ~Dh
  flops a value); the head dim's stride-2 halves made the TPU compiler lay q and k out with
  the sequence minor and copy them back for the attention kernels, and a roll of the head
  dim cost more elementwise passes than it saved.
  """
  x32 = x.astype(jnp.float32)
  swapped = jnp.matmul(x32, _pair_rotation(x.shape[-1]), precision=jax.lax.Precision.HIGHEST)
  return (x32 * cos[..., None, :] + swapped * sin[..., None, :]).astype(x.dtype)
