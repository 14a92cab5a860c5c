"""Synthetic latent-space data: deterministic random samples, for smoke runs and benchmarks.

Sample i is a pure function of (seed, i), so the position in the stream is one integer and a
resumed run reproduces its batches exactly. Each process builds only the rows of the global
batch that its devices hold and the global arrays are assembled with
`jax.make_array_from_process_local_data`.
"""

import jax
import numpy as np

from wan.data import batch as batch_lib


class SyntheticData:
  """Iterator of global batches in the layout of wan/data/batch.py."""

  def __init__(self, plan, mesh, seed: int, num_samples: int | None = None):
    self._plan, self._mesh, self._seed = plan, mesh, seed
    self._num_samples = num_samples
    self._next = 0
    self._shapes = batch_lib.shapes(plan)
    self._shardings = batch_lib.shardings(plan, mesh)
    self._rows = batch_lib.local_rows(plan, mesh)

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
