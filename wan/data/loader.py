"""The training stream of a real data set: batches of one bucket each, in a seeded order that is
a pure function of (seed, epoch), so the position is one integer (batches consumed) and a
resumed run sees exactly the batches the uninterrupted run saw.

An epoch: each bucket's samples (each `repeats` times) shuffled with (seed, epoch, bucket), cut
into global batches, the last one filled from the bucket's own start; then the batches of all
buckets shuffled with (seed, epoch). Each process reads only the rows of a batch that its
devices hold, from the cache (dataset_type=tfrecord / grain) or by decoding and encoding clips
on the fly (tf / hf), in a background thread a few batches ahead of the step.
"""

import queue
import threading

import jax
import numpy as np

from wan.data import batch as batch_lib
from wan.data import clips as clips_lib
from wan.data import records

PREFETCH = 2  # host batches ready ahead of the step


def epoch_batches(groups: dict, batch: int, seed: int, epoch: int, shuffle: bool,
                  shuffle_batches: bool = True) -> list:
  """The batches of one epoch: [(bucket, [sample ids])]. groups: {bucket: [sample ids]} (a
  sample id appears once per repeat). shuffle_batches=False leaves the order of the batches to
  the caller (grain's sampler)."""
  out = []
  for b, (bucket, ids) in enumerate(sorted(groups.items())):
    ids = list(ids)
    if shuffle:
      np.random.default_rng([seed, epoch, b]).shuffle(ids)
    for start in range(0, len(ids), batch):
      rows = [ids[(start + i) % len(ids)] for i in range(batch)]
      out.append((bucket, rows))
  if shuffle and shuffle_batches:
    order = np.random.default_rng([seed, epoch]).permutation(len(out))
    out = [out[i] for i in order]
  return out


def local_rows(plan, mesh) -> range:
  """The rows of a global batch that this process's devices hold."""
  b = plan.global_batch
  shard = batch_lib.shardings(plan, mesh)["latents"]
  rows = shard.addressable_devices_indices_map(batch_lib.shapes(plan)["latents"])
  starts = [idx[0].start or 0 for idx in rows.values()]
  stops = [b if idx[0].stop is None else idx[0].stop for idx in rows.values()]
  return range(min(starts), max(stops))


def assemble(samples: list[dict], plan) -> dict:
  """Host rows in the batch layout: text zero-padded to the plan's text length, the concat
  kinds' first-frame mask, batch axis first."""
  text_len = plan.text_len
  out = {"latents": np.stack([s["latents"] for s in samples])}
  text = np.zeros((len(samples), text_len, samples[0]["text"].shape[-1]), np.float32)
  mask = np.zeros((len(samples), text_len), bool)
  for i, s in enumerate(samples):
    n = len(s["text"])
    text[i, :n], mask[i, :n] = s["text"], True
  out.update(text=text, text_mask=mask)
  if plan.conditioning == "concat":
    out["cond"] = np.stack([s["cond"] for s in samples])
    cond_mask = np.zeros(out["latents"].shape[:4] + (4,), np.float32)
    cond_mask[:, 0] = 1.0
    out["cond_mask"] = cond_mask
  if plan.image_len:
    out["image"] = np.stack([s["image"] for s in samples])
  return out


class Stream:
  """Iterator of global batches (wan/data/batch.py's layout, latents of the batch's bucket)."""

  def __init__(self, plan, mesh, groups: dict, fetch, order=None):
    """groups: {bucket latent shape: [sample ids]}; fetch(ids) -> [sample dicts] (host);
    order(index) -> which batch of its epoch the index-th batch is (default: our own seeded
    permutation)."""
    self._plan, self._groups, self._fetch, self._order = plan, groups, fetch, order
    self._shardings = batch_lib.shardings(plan, mesh)
    self._rows = local_rows(plan, mesh)
    self._per_epoch = sum(-(-len(v) // plan.global_batch) for v in groups.values())
    self._next = 0
    self._epoch_cache = (None, None)
    self._queue, self._thread, self._stop = None, None, threading.Event()

  @property
  def steps_per_epoch(self) -> int:
    return self._per_epoch

  def state(self) -> dict:
    return {"next_batch": self._next}

  def restore(self, state: dict):
    self._halt()
    self._next = int(state["next_batch"])

  def _batch(self, index: int):
    epoch, i = divmod(index, self._per_epoch)
    if self._order is not None:
      i = self._order(index)
    if self._epoch_cache[0] != epoch:
      self._epoch_cache = (epoch, epoch_batches(
          self._groups, self._plan.global_batch, self._plan.seed, epoch, self._plan.data.shuffle,
          shuffle_batches=self._order is None))
    bucket, ids = self._epoch_cache[1][i]
    return bucket, assemble(self._fetch([ids[r] for r in self._rows]), self._plan)

  def _produce(self, start: int):
    index = start
    while not self._stop.is_set():
      try:
        item = (index, *self._batch(index))
      except Exception as e:  # pylint: disable=broad-except
        item = (index, e, None)
      while not self._stop.is_set():
        try:
          self._queue.put(item, timeout=0.1)
          break
        except queue.Full:
          continue
      index += 1

  def _halt(self):
    if self._thread is not None:
      self._stop.set()
      self._thread.join()
      self._thread, self._stop = None, threading.Event()

  def close(self):
    self._halt()

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    if self._thread is None:
      self._queue = queue.Queue(PREFETCH)
      self._thread = threading.Thread(target=self._produce, args=(self._next,), daemon=True)
      self._thread.start()
    index, bucket, host = self._queue.get()
    assert index == self._next
    if isinstance(bucket, Exception):
      raise bucket
    self._next += 1
    b = self._plan.global_batch
    return {k: jax.make_array_from_process_local_data(
        self._shardings[k], v, (b,) + v.shape[1:]) for k, v in host.items()}


def _groups(entries) -> dict:
  """{latent shape: [index, repeated]} of (latent shape, repeats) entries."""
  groups = {}
  for i, (shape, repeats) in enumerate(entries):
    groups.setdefault(tuple(shape), []).extend([i] * repeats)
  return groups


def from_cache(plan, mesh) -> Stream:
  """dataset_type=tfrecord / grain: a cache that job=prepare wrote."""
  manifest, cache = plan.data.manifest, plan.data.cache
  shapes = {name: tuple(b["latent_shape"]) for name, b in manifest["buckets"].items()}
  refs = [(shard["file"], r) for shard in manifest["shards"] for r in shard["records"]]
  reader = records.Reader(cache, manifest)
  groups = _groups((shapes[r["bucket"]], r["repeats"]) for _, r in refs)
  order = None
  if manifest["record_format"] == "arrayrecord":
    # dataset_type=grain: grain's index sampler orders each epoch's batches (deterministic in
    # the position, so the position alone is the checkpointed state).
    from grain import python as grain  # pylint: disable=import-outside-toplevel
    sampler = grain.IndexSampler(
        num_records=sum(-(-len(v) // plan.global_batch) for v in groups.values()),
        shard_options=grain.NoSharding(), shuffle=plan.data.shuffle, num_epochs=None,
        seed=plan.seed)
    order = lambda index: sampler[index].record_key
  return Stream(plan, mesh, groups, lambda ids: [reader.read(*refs[i]) for i in ids], order)


def on_the_fly(plan, mesh, encoders) -> Stream:
  """dataset_type=tf / hf: clips decoded and encoded as the stream reaches them."""
  from wan.data import encode as encode_lib  # pylint: disable=import-outside-toplevel
  clips = plan.data.clips
  vae_cfg = encoders.vae_cfg

  def fetch(ids):
    # Rows of one batch share a bucket: one encoder call for all of them.
    pixels = np.stack([clips_lib.read_pixels(clips[i]) for i in ids])
    return encode_lib.encode(encoders, pixels, [clips[i].item.caption for i in ids])

  return Stream(plan, mesh, _groups((c.latent_shape(vae_cfg), c.repeats) for c in clips), fetch)
