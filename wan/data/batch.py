"""The one batch layout that every data set produces: keys, global shapes, dtypes, shardings.

Unpacked (one clip per row, a batch of one bucket):
  latents    (B, F, H, W, C) float32   clean VAE latents, normalised as the VAE's statistics say
  text       (B, L, D_text) float32    text-encoder states, zero past each caption
  text_mask  (B, L) bool               True on caption tokens
  cond       (B, F, H, W, C) float32   concat conditioning: first-frame latents, zeros after
  cond_mask  (B, F, H, W, 4) float32   concat conditioning: 1 on the first latent frame
  image      (B, N, D_image) float32   Wan 2.1 I2V: CLIP states of the first frame

Packed (pack_sequences=True: B rows of S = plan.seq_len tokens, up to K clips of any buckets per
row, wan/data/packing.py; the row sizes are plan.data.packing's):
  tokens             (B, S, pv * C) float32    patchified clean latents, clip after clip
  positions          (B, S, 3) int32           (frame, row, column) in each clip's own grid
  segment_ids        (B, S) int32              1..n for a row's n clips, 0 on padding
  text               (B, L_row, D_text) float32  the clips' captions one after another
  text_segment_ids   (B, L_row) int32          the clip of each caption token, 0 on padding
  segment_grid       (B, K, 3) int32           token grid (f, h, w) of each clip, 0 past the last
  cond_tokens        (B, S, pv * C) float32    concat conditioning, patchified like tokens
  cond_mask_tokens   (B, S, pv * 4) float32
  image              (B, N_row, D_image) float32  Wan 2.1 I2V: 257 CLIP states per clip
  image_segment_ids  (B, N_row) int32

pv = prod(patch_size). Every entry is split over the batch axes (data, fsdp) by the rule table.
"""

import math

import jax
import numpy as np

from wan import sharding
from wan.conditioning import MASK_CHANNELS

AXES = {"latents": ("batch", None, None, None, None), "cond": ("batch", None, None, None, None),
        "cond_mask": ("batch", None, None, None, None), "text": ("batch", None, None),
        "text_mask": ("batch", None), "image": ("batch", None, None),
        "tokens": ("batch", None, None), "positions": ("batch", None, None),
        "segment_ids": ("batch", None), "text_segment_ids": ("batch", None),
        "segment_grid": ("batch", None, None), "cond_tokens": ("batch", None, None),
        "cond_mask_tokens": ("batch", None, None), "image_segment_ids": ("batch", None)}
DTYPES = {"latents": np.float32, "cond": np.float32, "cond_mask": np.float32,
          "text": np.float32, "text_mask": np.bool_, "image": np.float32,
          "tokens": np.float32, "positions": np.int32, "segment_ids": np.int32,
          "text_segment_ids": np.int32, "segment_grid": np.int32, "cond_tokens": np.float32,
          "cond_mask_tokens": np.float32, "image_segment_ids": np.int32}


def shapes(plan) -> dict:
  """Global shape of every batch entry of this plan (packed when plan.data.pack)."""
  if plan.data.pack:
    return _packed_shapes(plan)
  f, h, w, c = plan.latent_shape
  b = plan.global_batch
  out = {"latents": (b, f, h, w, c), "text": (b, plan.text_len, plan.model.text_dim),
         "text_mask": (b, plan.text_len)}
  if plan.conditioning == "concat":
    out.update(cond=(b, f, h, w, c), cond_mask=(b, f, h, w, MASK_CHANNELS))
  if plan.image_len:
    out["image"] = (b, plan.image_len, plan.model.image_dim)
  return out


def _packed_shapes(plan) -> dict:
  rows, b = plan.data.packing, plan.global_batch
  s, pv, c = rows.seq_len, math.prod(plan.model.patch_size), plan.latent_shape[-1]
  out = {"tokens": (b, s, pv * c), "positions": (b, s, 3), "segment_ids": (b, s),
         "text": (b, rows.text_len, plan.model.text_dim), "text_segment_ids": (b, rows.text_len),
         "segment_grid": (b, rows.max_segments, 3)}
  if plan.conditioning == "concat":
    out.update(cond_tokens=(b, s, pv * c), cond_mask_tokens=(b, s, pv * MASK_CHANNELS))
  if plan.image_len:
    out.update(image=(b, rows.image_len, plan.model.image_dim),
               image_segment_ids=(b, rows.image_len))
  return out


def shardings(plan, mesh) -> dict:
  """NamedSharding of every batch entry (split over data x fsdp where the batch divides)."""
  return {k: jax.NamedSharding(mesh, sharding.spec(AXES[k], s, mesh))
          for k, s in shapes(plan).items()}


def abstract(plan, mesh) -> dict:
  """ShapeDtypeStructs (with shardings) of a batch, for compiling without data."""
  sh = shardings(plan, mesh)
  return {k: jax.ShapeDtypeStruct(s, DTYPES[k], sharding=sh[k]) for k, s in shapes(plan).items()}


def local_rows(plan, mesh) -> range:
  """The rows of a global batch that this process's devices hold (the same for every key)."""
  b = plan.global_batch
  key = "tokens" if plan.data.pack else "latents"
  shard = shardings(plan, mesh)[key]
  rows = shard.addressable_devices_indices_map(shapes(plan)[key])
  starts = [idx[0].start or 0 for idx in rows.values()]
  stops = [b if idx[0].stop is None else idx[0].stop for idx in rows.values()]
  return range(min(starts), max(stops))
