"""Model inputs per conditioning kind, shared by training, sampling and evaluation.

Kinds (the plan picks one from the model family and model_type, wan/families.py):
  none         text-to-video: the noisy latents are the input.
  concat       36-channel image-to-video (Wan 2.1 I2V, Wan 2.2 A14B I2V): noisy latents (C),
               a 4-channel first-frame mask and the condition latents (C), concatenated.
  first_frame  TI2V 5B image-to-video: the first latent frame is the clean image latent, its
               tokens get timestep 0 and it is left out of the loss.
"""

import jax.numpy as jnp

KINDS = ("none", "concat", "first_frame")
MASK_CHANNELS = 4  # the first-frame mask of the concat kind: one channel per VAE time step


def input_channels(kind: str, latent_channels: int) -> int:
  """Transformer input channels of a conditioning kind, for a latent space of that width."""
  return 2 * latent_channels + MASK_CHANNELS if kind == "concat" else latent_channels


def from_batch(kind: str, batch: dict) -> dict:
  """The conditioning inputs of a training batch (see wan/data/batch.py for its keys)."""
  if kind == "concat":
    return {"cond": batch["cond"], "cond_mask": batch["cond_mask"]}
  if kind == "first_frame":
    return {"first_frame": batch["latents"][:, :1]}
  return {}


def model_inputs(kind: str, x_t, t, patch_size, cond: dict):
  """(model input, timestep, loss frames or None) for noisy latents at timestep t.

  x_t: (B, F, H, W, C) noisy latents; t: (B,) timesteps in [0, 1000]; patch_size: the
  transformer's (pt, ph, pw); cond: `from_batch`'s dict: concat {"cond": (B, F, H, W, C),
  "cond_mask": (B, F, H, W, 4)}, first_frame {"first_frame": (B, 1, H, W, C)}.
  Returns the input (B, F, H, W, C_in), the timestep (B,) or per token (B, S) and, for
  first_frame, a (F,) bool mask of the latent frames the loss counts.
  """
  if kind == "concat":
    return jnp.concatenate([x_t, cond["cond_mask"].astype(x_t.dtype),
                            cond["cond"].astype(x_t.dtype)], axis=-1), t, None
  if kind == "first_frame":
    x_t = x_t.at[:, :1].set(cond["first_frame"].astype(x_t.dtype))
    f, h, w = x_t.shape[1:4]
    _, ph, pw = patch_size  # the temporal patch is 1 (checked with the family)
    tokens_per_frame = (h // ph) * (w // pw)
    noisy = jnp.arange(f * tokens_per_frame) >= tokens_per_frame  # tokens are frame-major
    return x_t, t[:, None] * noisy[None, :], jnp.arange(f) > 0
  if kind == "none":
    return x_t, t, None
  raise ValueError(f"conditioning kind {kind!r} is not one of {KINDS}")
