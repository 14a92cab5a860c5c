"""Training data. Every data set yields dicts of global jax.Arrays (sharded over the batch) and
can report and restore its position, so a resumed run sees exactly the samples it would have:

    it = wan.data.make(c, plan, mesh)
    batch = next(it)          # {"latents": (B, F, H, W, C), "text": (B, L, D), "text_mask": ...}
    state = it.state()        # JSON-serialisable position
    it.restore(state)

Keys: latents (clean VAE latents, normalised), text (text-encoder states, zero past the caption),
text_mask (bool); for 36-channel I2V models also cond (the first-frame condition latents) and
cond_mask (B, F, H, W, 4); for Wan 2.1 I2V also image (B, 257, image_dim) CLIP states.
"""

from wan.data import synthetic

# Every data set produces the same batch layout, so shapes and shardings are defined once.
batch_shapes = synthetic.batch_shapes
batch_shardings = synthetic.batch_shardings


def make(c, plan, mesh):
  """The data iterator named by c.dataset_type (validated by wan.config.plan)."""
  if c.dataset_type == "synthetic":
    return synthetic.SyntheticData(plan, mesh, seed=c.seed, num_samples=c.synthetic_num_samples)
  raise NotImplementedError(f"dataset_type={c.dataset_type!r} is not implemented yet")
