"""Training data. Every data set yields dicts of global jax.Arrays in the one layout of
wan/data/batch.py (sharded over the batch) and can report and restore its position, so a
resumed run sees exactly the samples it would have:

    it = wan.data.make(plan, mesh)
    batch = next(it)          # {"latents": (B, F, H, W, C), "text": (B, L, D), "text_mask": ...}
    state = it.state()        # JSON-serialisable position
    it.restore(state)
"""

from wan.data import synthetic


def make(plan, mesh):
  """The data iterator of the plan's data set (plan.data: wan.plan.DataSettings)."""
  if plan.data.kind == "synthetic":
    return synthetic.SyntheticData(plan, mesh, seed=plan.seed, num_samples=plan.data.num_samples)
  raise NotImplementedError(f"dataset_type={plan.data.kind!r} is not implemented yet")
