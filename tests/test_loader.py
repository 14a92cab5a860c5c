"""The real-data stream: one-bucket batches in a seeded order per epoch, exact resume."""

import dataclasses

import jax
import numpy as np

from configs import wan21_t2v
from wan import plan as plan_lib
from wan import sharding
from wan.data import batch as batch_lib
from wan.data import loader

GROUPS = {(2, 8, 8, 16): [0, 1, 2, 3, 4], (1, 8, 8, 16): [5, 6], (2, 6, 10, 16): [7, 7, 7]}


def test_epoch_batches_hold_one_bucket_and_every_sample():
  batches = loader.epoch_batches(GROUPS, 2, seed=0, epoch=0, shuffle=True)
  assert len(batches) == 3 + 1 + 2  # ceil(5/2) + ceil(2/2) + ceil(3/2)
  for bucket, rows in batches:
    assert len(rows) == 2 and set(rows) <= set(GROUPS[bucket])
  seen = [i for _, rows in batches for i in rows]
  assert set(seen) == set(range(8))
  # The last batch of the 5-sample bucket is filled with one of its own samples: 6 rows.
  big = sorted(i for b, rows in batches if b == (2, 8, 8, 16) for i in rows)
  assert len(big) == 6 and set(big) == {0, 1, 2, 3, 4}


def test_epoch_order_is_seeded_and_changes_per_epoch():
  a = loader.epoch_batches(GROUPS, 2, seed=1, epoch=0, shuffle=True)
  assert a == loader.epoch_batches(GROUPS, 2, seed=1, epoch=0, shuffle=True)
  assert a != loader.epoch_batches(GROUPS, 2, seed=1, epoch=1, shuffle=True)
  assert a != loader.epoch_batches(GROUPS, 2, seed=2, epoch=0, shuffle=True)
  plain = loader.epoch_batches(GROUPS, 2, seed=1, epoch=0, shuffle=False)
  assert plain == loader.epoch_batches(GROUPS, 2, seed=9, epoch=5, shuffle=False)
  # Buckets in sorted order; a bucket's last batch wraps to its start.
  assert [rows for _, rows in plain] == [[5, 6], [7, 7], [7, 7], [0, 1], [2, 3], [4, 0]]


def _plan(shuffle=True):
  c = wan21_t2v.get_config("tiny")
  c.global_batch_size = 2
  p = plan_lib.make(c, jax.devices())
  return dataclasses.replace(p, data=dataclasses.replace(p.data, kind="tfrecord",
                                                         shuffle=shuffle))


def _fetch(ids):
  """Samples whose values say which sample they are (caption length varies with the id)."""
  out = []
  for i in ids:
    shape = next(s for s, members in GROUPS.items() if i in members)
    out.append({"latents": np.full(shape, float(i), np.float32),
                "text": np.full((1 + i % 3, 32), float(i), np.float32)})
  return out


def _ids(batch):
  return [int(x) for x in np.asarray(batch["latents"])[:, 0, 0, 0, 0]]


def test_stream_resumes_exactly_across_epochs():
  p = _plan()
  mesh = sharding.make_mesh(p.ici, p.dcn, jax.devices())
  whole = loader.Stream(p, mesh, GROUPS, _fetch)
  seen = [_ids(next(whole)) for _ in range(14)]  # more than two epochs of 6 batches
  whole.close()
  first = loader.Stream(p, mesh, GROUPS, _fetch)
  head = [_ids(next(first)) for _ in range(5)]
  state = first.state()
  first.close()
  second = loader.Stream(p, mesh, GROUPS, _fetch)
  second.restore(state)
  tail = [_ids(next(second)) for _ in range(9)]
  second.close()
  assert head + tail == seen
  assert seen[:6] != seen[6:12]  # reshuffled in the second epoch


def test_stream_pads_text_and_marks_it():
  p = _plan(shuffle=False)
  mesh = sharding.make_mesh(p.ici, p.dcn, jax.devices())
  stream = loader.Stream(p, mesh, GROUPS, _fetch)
  batch = next(stream)
  stream.close()
  ids = _ids(batch)
  text, mask = np.asarray(batch["text"]), np.asarray(batch["text_mask"])
  assert text.shape == (2, p.text_len, 32)
  for row, i in enumerate(ids):
    n = 1 + i % 3
    assert mask[row].tolist() == [True] * n + [False] * (p.text_len - n)
    assert (text[row, :n] == i).all() and (text[row, n:] == 0).all()
  want = batch_lib.shardings(p, mesh)
  assert all(batch[k].sharding == want[k] for k in batch)


def test_grain_sampler_orders_batches_deterministically():
  p = _plan()
  mesh = sharding.make_mesh(p.ici, p.dcn, jax.devices())
  from grain import python as grain  # pylint: disable=import-outside-toplevel
  sampler = grain.IndexSampler(num_records=6, shard_options=grain.NoSharding(), shuffle=True,
                               num_epochs=None, seed=0)
  order = lambda index: sampler[index].record_key
  run = lambda: loader.Stream(p, mesh, GROUPS, _fetch, order)
  a = run()
  seen = [_ids(next(a)) for _ in range(12)]
  a.close()
  b = run()
  b.restore({"next_batch": 7})
  assert [_ids(next(b)) for _ in range(5)] == seen[7:]
  b.close()
  unshuffled = loader.epoch_batches(GROUPS, 2, p.seed, 0, True, shuffle_batches=False)
  assert sorted(map(tuple, seen[:6])) == sorted(tuple(r) for _, r in unshuffled)
