"""Training data. Every data set yields dicts of global jax.Arrays in the one layout of
wan/data/batch.py (sharded over the batch) and can report and restore its position, so a
resumed run sees exactly the samples it would have:

    it = wan.data.make(plan, mesh)
    batch = next(it)          # {"latents": (B, F, H, W, C), "text": (B, L, D), "text_mask": ...}
    state = it.state()        # JSON-serialisable position
    it.restore(state)

Rooms: sources.py (data-set descriptions -> items), video.py + frames.py (decoding, frame
extraction), buckets.py, clips.py (items -> clips), encode.py (clips -> samples on the devices),
records.py (the cache), prepare.py (job=prepare), loader.py (the real-data stream),
synthetic.py, packing.py.
"""

from wan.data import synthetic


def make(plan, mesh):
  """The data iterator of the plan's data set (plan.data: wan.plan_data.DataSettings)."""
  data = plan.data
  if data.kind == "synthetic":
    return synthetic.SyntheticData(plan, mesh, seed=plan.seed, num_samples=data.num_samples)
  from wan.data import loader  # pylint: disable=import-outside-toplevel
  if data.kind in ("tfrecord", "grain"):
    return loader.from_cache(plan, mesh)
  from wan.data import encode  # pylint: disable=import-outside-toplevel
  encoders = encode.load(data.encoding)
  if data.cache:  # dataset_save_location
    return loader.saved(plan, mesh, encoders)
  return loader.on_the_fly(plan, mesh, encoders)
