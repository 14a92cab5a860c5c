"""The one batch layout that every data set produces: keys, global shapes, dtypes, shardings.

  latents    (B, F, H, W, C) float32   clean VAE latents, normalised as the VAE's statistics say
  text       (B, L, D_text) float32    text-encoder states, zero past each caption
  text_mask  (B, L) bool               True on caption tokens
  cond       (B, F, H, W, C) float32   concat conditioning: first-frame latents, zeros after
  cond_mask  (B, F, H, W, 4) float32   concat conditioning: 1 on the first latent frame
  image      (B, N, D_image) float32   Wan 2.1 I2V: CLIP states of the first frame

Every entry is split over the batch axes (data, fsdp) by the rule table.
"""

import jax
import numpy as np

from wan import sharding

AXES = {"latents": ("batch", None, None, None, None), "cond": ("batch", None, None, None, None),
        "cond_mask": ("batch", None, None, None, None), "text": ("batch", None, None),
        "text_mask": ("batch", None), "image": ("batch", None, None)}
DTYPES = {"latents": np.float32, "cond": np.float32, "cond_mask": np.float32,
          "text": np.float32, "text_mask": np.bool_, "image": np.float32}


def shapes(plan) -> dict:
  """Global shape of every batch entry of this plan."""
  f, h, w, c = plan.latent_shape
  b = plan.global_batch
  out = {"latents": (b, f, h, w, c), "text": (b, plan.text_len, plan.model.text_dim),
         "text_mask": (b, plan.text_len)}
  if plan.conditioning == "concat":
    out.update(cond=(b, f, h, w, c), cond_mask=(b, f, h, w, 4))
  if plan.image_len:
    out["image"] = (b, plan.image_len, plan.model.image_dim)
  return out


def shardings(plan, mesh) -> dict:
  """NamedSharding of every batch entry (split over data x fsdp where the batch divides)."""
  return {k: jax.NamedSharding(mesh, sharding.spec(AXES[k], s, mesh))
          for k, s in shapes(plan).items()}


def abstract(plan, mesh) -> dict:
  """ShapeDtypeStructs (with shardings) of a batch, for compiling without data."""
  sh = shardings(plan, mesh)
  return {k: jax.ShapeDtypeStruct(s, DTYPES[k], sharding=sh[k]) for k, s in shapes(plan).items()}
