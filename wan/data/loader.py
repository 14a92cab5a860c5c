"""The training stream of a real data set: batches of one bucket each, in a seeded order that is
a pure function of (seed, epoch), so the position is one integer (batches consumed) and a
resumed run sees exactly the batches the uninterrupted run saw.

An epoch: each bucket's samples (each `repeats` times) shuffled with (seed, epoch, bucket), cut
into global batches, the last one filled from the bucket's own start; then the batches of all
buckets shuffled with (seed, epoch). Each process reads only the rows of a batch that its
devices hold, from the cache (dataset_type=tfrecord / grain) or by decoding and encoding clips
on the fly (tf / hf), in a background thread that puts batches on the devices a few batches
ahead of the step.

Packed (pack_sequences=True): all of an epoch's samples (buckets together, repeats included)
shuffled with (seed, epoch), packed first fit in that order into rows of plan.seq_len tokens
(wan/data/packing.py `epoch_rows`, from token counts alone: no data is read to plan), and cut
into batches of global_batch rows, the last one filled from the epoch's first rows. Epochs may
differ by a row or so; the position is still one integer (batches consumed) and a resumed run
finds its epoch by packing the epochs before it again (token counts only).
"""

import dataclasses
import queue
import threading

import jax
import numpy as np

from wan import fs, plan_data
from wan.data import batch as batch_lib
from wan.data import clips as clips_lib
from wan.data import packing, records

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


def packed_batches(groups: dict, plan, epoch: int) -> list:
  """The packed batches of one epoch: [[sample ids of each row] x global_batch].
  groups: {bucket: [sample ids]} (a sample id once per repeat)."""
  slots = [i for bucket in sorted(groups) for i in groups[bucket]]
  rows = packing.epoch_rows({bucket: len(ids) for bucket, ids in groups.items()},
                            plan.model.patch_size, plan.data.packing.seq_len, plan.seed, epoch,
                            plan.data.shuffle)
  rows = [[slots[j] for j in row] for row in rows]
  b = plan.global_batch
  return [[rows[(start + i) % len(rows)] for i in range(b)] for start in range(0, len(rows), b)]


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


def assemble_packed(rows: list[list[dict]], plan) -> dict:
  """Host rows of the packed layout (wan/data/batch.py) from the samples of each row, in the
  rows' order: the epoch plan's rows, packed as planned (no first fit of their own)."""
  sizes = plan.data.packing
  masked = plan.options.mask_padding_tokens
  items, row_of = [], []
  for r, samples in enumerate(rows):
    for s in samples:
      text = s["text"]
      if not masked:  # zero-padded to the caption length and attended, as unpacked
        text = np.concatenate([text, np.zeros((sizes.caption_len - len(text), text.shape[-1]),
                                              text.dtype)])
      item = {"latents": s["latents"], "text": text}
      if plan.conditioning == "concat":
        cond_mask = np.zeros(s["latents"].shape[:3] + (batch_lib.MASK_CHANNELS,), np.float32)
        cond_mask[0] = 1.0
        item.update(cond=s["cond"], cond_mask=cond_mask)
      if plan.image_len:
        item["image"] = s["image"]
      items.append(item)
      row_of.append(r)
  out = packing.pack(items, sizes.seq_len, sizes.text_len, plan.model.patch_size,
                     sizes.image_len, num_rows=len(rows), max_segments=sizes.max_segments,
                     rows=row_of)
  del out["placement"]  # a host-side index, not a fixed-shape batch entry
  return out


class Stream:
  """Iterator of global batches (wan/data/batch.py's layout: one bucket's latents, or packed
  rows of any buckets when plan.data.pack)."""

  def __init__(self, plan, mesh, groups: dict, fetch, order=None):
    """groups: {bucket latent shape: [sample ids]}; fetch(ids) -> [sample dicts] (host);
    order(index) -> which batch of its epoch the index-th batch is (default: our own seeded
    permutation; unpacked only)."""
    if plan.data.pack and order is not None:
      raise ValueError("packed epochs are ordered by their packing; give no batch order")
    self._plan, self._groups, self._fetch, self._order = plan, groups, fetch, order
    self._shardings = batch_lib.shardings(plan, mesh)
    self._rows = batch_lib.local_rows(plan, mesh)
    self._per_epoch = None if plan.data.pack else plan_data.steps_per_epoch(
        map(len, groups.values()), plan.global_batch)
    self._epoch_lengths = {}  # packed: batches of each epoch planned so far
    self._next = 0
    self._epoch_cache = (None, None)
    self._queue, self._thread, self._stop = None, None, threading.Event()

  @property
  def steps_per_epoch(self) -> int:
    """Batches per epoch (packed: epoch 0's; each epoch packs its own order)."""
    return self._epoch_length(0)

  def state(self) -> dict:
    return {"next_batch": self._next}

  def restore(self, state: dict):
    self._halt()
    self._next = int(state["next_batch"])

  def _epoch(self, epoch: int) -> list:
    if self._epoch_cache[0] != epoch:
      p = self._plan
      if p.data.pack:
        batches = packed_batches(self._groups, p, epoch)
        self._epoch_lengths[epoch] = len(batches)
      else:
        batches = epoch_batches(self._groups, p.global_batch, p.seed, epoch, p.data.shuffle,
                                shuffle_batches=self._order is None)
      self._epoch_cache = (epoch, batches)
    return self._epoch_cache[1]

  def _epoch_length(self, epoch: int) -> int:
    if self._per_epoch is not None:
      return self._per_epoch
    if not self._plan.data.shuffle:
      epoch = 0  # every epoch packs the same order
    if epoch not in self._epoch_lengths:
      self._epoch_lengths[epoch] = len(packed_batches(self._groups, self._plan, epoch))
    return self._epoch_lengths[epoch]

  def _locate(self, index: int) -> tuple[int, int]:
    """(epoch, batch within it) of the index-th batch of the stream."""
    if self._per_epoch is not None or not self._plan.data.shuffle:
      return divmod(index, self._epoch_length(0))
    epoch = 0
    while index >= self._epoch_length(epoch):
      index -= self._epoch_length(epoch)
      epoch += 1
    return epoch, index

  def _batch(self, index: int):
    epoch, i = self._locate(index)
    if self._order is not None:
      i = self._order(index)
    batch = self._epoch(epoch)[i]
    if self._plan.data.pack:
      rows = [batch[r] for r in self._rows]
      samples = iter(self._fetch([sample for row in rows for sample in row]))
      return None, assemble_packed([[next(samples) for _ in row] for row in rows], self._plan)
    bucket, ids = batch
    return bucket, assemble(self._fetch([ids[r] for r in self._rows]), self._plan)

  def _produce(self, start: int):
    index = start
    while not self._stop.is_set():
      try:  # on the devices before the step asks for it
        item = (index, None, self._to_devices(self._batch(index)[1]))
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
    index, error, batch = self._queue.get()
    assert index == self._next
    if error is not None:
      raise error
    self._next += 1
    return batch

  def _to_devices(self, host: dict) -> dict:
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
  if manifest["record_format"] == "arrayrecord" and not plan.data.pack:
    # dataset_type=grain: grain's index sampler orders each epoch's batches (deterministic in
    # the position, so the position alone is the checkpointed state). Packed epochs are
    # ordered by their packing (epochs of different lengths).
    from grain import python as grain  # pylint: disable=import-outside-toplevel
    sampler = grain.IndexSampler(
        num_records=plan_data.steps_per_epoch(map(len, groups.values()), plan.global_batch),
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
    # One encoder call per bucket (an unpacked batch is one bucket; packed rows mix them).
    out = [None] * len(ids)
    by_bucket = {}
    for j, i in enumerate(ids):
      by_bucket.setdefault(clips[i].latent_shape(vae_cfg), []).append(j)
    for js in by_bucket.values():
      pixels = np.stack([clips_lib.read_pixels(clips[ids[j]]) for j in js])
      samples = encode_lib.encode(encoders, pixels, [clips[ids[j]].item.caption for j in js])
      for j, sample in zip(js, samples):
        out[j] = sample
    return out

  return Stream(plan, mesh, _groups((c.latent_shape(vae_cfg), c.repeats) for c in clips), fetch)


def saved(plan, mesh, encoders) -> Stream:
  """dataset_type=tf / hf with dataset_save_location: the clips are encoded once into a cache
  there (kept for later runs; each process its share), then read like job=prepare's."""
  from wan.data import prepare  # pylint: disable=import-outside-toplevel
  data = plan.data
  if not fs.exists(fs.join(data.cache, records.MANIFEST)):
    p, n = jax.process_index(), jax.process_count()
    keyed = list(zip(plan_data.saved_keys(data.clips), data.clips))[p::n]
    prepare.write(encoders, keyed, data.manifest["skipped"] if p == 0 else [], data.cache,
                  "tfrecord", 0, {"sources": [], "settings": data.prepared_with})
  cached = dataclasses.replace(data, kind="tfrecord", manifest=records.read_manifest(data.cache))
  return from_cache(dataclasses.replace(plan, data=cached), mesh)
