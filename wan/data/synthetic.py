"""Synthetic latent-space data: deterministic random samples, for smoke runs and benchmarks.

Sample i is a pure function of (seed, i), so the position in the stream is one integer and a
resumed run reproduces its batches exactly. Each process builds only the rows of the global
batch that its devices hold and the global arrays are assembled with
`jax.make_array_from_process_local_data`.
"""

import jax
import numpy as np

from wan import sharding

_AXES = {"latents": ("batch", None, None, None, None), "cond": ("batch", None, None, None, None),
         "cond_mask": ("batch", None, None, None, None), "text": ("batch", None, None),
         "text_mask": ("batch", None), "image": ("batch", None, None)}


def batch_shapes(plan) -> dict:
  """Global shape of every batch entry for this plan (see wan/data/__init__.py for the keys)."""
  f, h, w, c = plan.latent_shape
  b, text_dim = plan.global_batch, plan.model.text_dim
  shapes = {"latents": (b, f, h, w, c), "text": (b, plan.text_len, text_dim),
            "text_mask": (b, plan.text_len)}
  if plan.conditioning == "concat":
    shapes.update(cond=(b, f, h, w, c), cond_mask=(b, f, h, w, 4))
  if plan.image_len:
    shapes["image"] = (b, plan.image_len, plan.model.image_dim)
  return shapes


def batch_shardings(plan, mesh) -> dict:
  """Every batch entry sharded over the batch axis (data, fsdp) by the rule table."""
  return {k: jax.NamedSharding(mesh, sharding.spec(_AXES[k], s, mesh))
          for k, s in batch_shapes(plan).items()}


class SyntheticData:
  """Iterator of global batches (see wan/data/__init__.py for the keys)."""

  def __init__(self, plan, mesh, seed: int, num_samples: int | None = None):
    self._plan, self._mesh, self._seed = plan, mesh, seed
    self._num_samples = num_samples
    self._next = 0
    b = plan.global_batch
    self._shapes = batch_shapes(plan)
    self._shardings = batch_shardings(plan, mesh)
    # The rows of the global batch this process's devices hold (the same for every key).
    rows = self._shardings["latents"].addressable_devices_indices_map(self._shapes["latents"])
    starts = [idx[0].start or 0 for idx in rows.values()]
    stops = [b if idx[0].stop is None else idx[0].stop for idx in rows.values()]
    self._rows = range(min(starts), max(stops))

  def state(self) -> dict:
    return {"next_sample": self._next}

  def restore(self, state: dict):
    self._next = int(state["next_sample"])

  def __iter__(self):
    return self

  def _sample(self, index: int) -> dict:
    if self._num_samples:
      index %= self._num_samples  # epochs over a finite synthetic set
    rng = np.random.default_rng([self._seed, index])
    f, h, w, c = self._plan.latent_shape
    text_len, text_dim = self._plan.text_len, self._plan.model.text_dim
    latents = rng.standard_normal((f, h, w, c), np.float32)
    length = int(rng.integers(max(1, text_len // 4), text_len + 1))
    mask = np.arange(text_len) < length
    text = rng.standard_normal((text_len, text_dim), np.float32) * mask[:, None]  # zero padding
    out = {"latents": latents, "text": text, "text_mask": mask}
    if "cond" in self._shapes:
      # The I2V condition: the first latent frame of the video, zeros after it; mask 1 there.
      cond = np.zeros_like(latents)
      cond[0] = latents[0]
      cond_mask = np.zeros((f, h, w, 4), np.float32)
      cond_mask[0] = 1.0
      out.update(cond=cond, cond_mask=cond_mask)
    if "image" in self._shapes:
      out["image"] = rng.standard_normal(self._shapes["image"][1:], np.float32)
    return out

  def __next__(self) -> dict:
    b = self._plan.global_batch
    local = [self._sample(self._next + i) for i in self._rows]
    self._next += b
    return {k: jax.make_array_from_process_local_data(
        self._shardings[k], np.stack([s[k] for s in local]), self._shapes[k])
            for k in self._shapes}
