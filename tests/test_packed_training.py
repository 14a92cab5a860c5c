"""pack_sequences=True: the packed loss is the mean of the unpacked per-clip losses (same sigmas,
noise and caption drops), and a packed run on a real cache of several buckets trains and resumes
exactly."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import wan21_i2v, wan21_t2v, wan22_ti2v
from tests import clip_fixtures
from wan import plan, sharding, train, transformer
from wan.data import batch as batch_lib
from wan.data import loader, packing, prepare
from wan.plan_data import Packing

# Latent (F, H, W) of the clips (patch 1x2x2): tokens 32 | 16, 12, 2 -> rows [0], [1, 2, 3]
# (the second with 2 padding tokens).
SHAPES = ((2, 8, 8), (1, 8, 8), (2, 4, 6), (1, 2, 4))
# TI2V leaves each clip's first frame out of the loss: clips of two frames (32 | 12, 8, 4).
TI2V_SHAPES = ((2, 8, 8), (2, 4, 6), (2, 4, 4), (2, 2, 4))
ROWS = [[0], [1, 2, 3]]
SIGMAS = np.array([0.2, 0.55, 0.8, 0.35], np.float32)
DROP = np.array([False, True, False, False])
# Measured relative error |packed - mean of unpacked| / |mean of unpacked| on this CPU, float32
# HIGHEST, bell weighting on, one caption dropped: t2v 1.6e-7, t2v with padding attended
# (mask_padding_tokens=False) 3.2e-7, i2v (concat + CLIP) 2.1e-7, ti2v (first_frame) 1.6e-7.
BOUND = 1e-5


def _plan(module, model_type, mask_padding=True):
  c = module.get_config("tiny")
  c.update(model_type=model_type, precision="HIGHEST", mask_padding_tokens=mask_padding,
           caption_dropout=0.5, checkpoint_every=-1, write_metrics=False)
  p = plan.make(c, jax.devices()[:1])
  seq_len, k = 32, 16  # the largest clip's tokens; 32 // the smallest clip's 2
  caption = 6 if mask_padding else p.text_len
  rows = Packing(seq_len=seq_len, max_segments=k, caption_len=caption, text_len=k * caption,
                 image_len=k * p.image_len)
  return p, dataclasses.replace(p, data=dataclasses.replace(p.data, pack=True, packing=rows))


def _samples(p, shapes, seed=0):
  rng = np.random.default_rng(seed)
  c = p.latent_shape[-1]
  out = []
  for i, shape in enumerate(shapes):
    s = {"latents": rng.standard_normal((*shape, c), np.float32),
         "noise": rng.standard_normal((*shape, c), np.float32),
         "text": rng.standard_normal((2 + i, p.model.text_dim), np.float32)}
    if p.conditioning == "concat":
      s["cond"] = np.zeros_like(s["latents"])
      s["cond"][0] = s["latents"][0]
    if p.image_len:
      s["image"] = rng.standard_normal((p.image_len, p.model.image_dim), np.float32)
    out.append(s)
  return out


def _unpacked_losses(params, p, samples):
  """flow_loss of each clip alone (a batch of one at its own bucket, caption padded)."""
  losses = []
  for s, sigma, drop in zip(samples, SIGMAS, DROP):
    batch = loader.assemble([s], p)
    losses.append(float(train.flow_loss(
        params, batch, jnp.asarray([sigma]), jnp.asarray(s["noise"][None]), p,
        drop=jnp.asarray([drop]))))
  return np.array(losses)


def _packed_loss(params, packed_plan, samples, rows=ROWS):
  """The packed loss of the same clips, sigmas, noise and drops, through the loader's rows."""
  batch = loader.assemble_packed([[samples[i] for i in row] for row in rows], packed_plan)
  noise = loader.assemble_packed([[dict(samples[i], latents=samples[i]["noise"]) for i in row]
                                  for row in rows], packed_plan)["tokens"]
  k = packed_plan.data.packing.max_segments
  sigma, drop = np.zeros((len(rows), k), np.float32), np.zeros((len(rows), k), bool)
  for r, row in enumerate(rows):
    sigma[r, :len(row)], drop[r, :len(row)] = SIGMAS[row], DROP[row]
  return float(train.packed_flow_loss(params, batch, jnp.asarray(sigma), jnp.asarray(noise),
                                      packed_plan, drop=jnp.asarray(drop)))


@pytest.mark.parametrize("module, model_type, mask_padding, kind", [
    (wan21_t2v, "T2V", True, "none"), (wan21_t2v, "T2V", False, "none"),
    (wan21_i2v, "I2V", True, "concat"), (wan22_ti2v, "I2V", True, "first_frame")],
                         ids=["t2v", "t2v-padding-attended", "i2v", "ti2v"])
def test_packed_loss_is_the_mean_of_the_unpacked_losses(module, model_type, mask_padding, kind):
  p, packed_plan = _plan(module, model_type, mask_padding)
  assert p.conditioning == kind
  params = transformer.init(p.model, jax.random.key(0))
  samples = _samples(p, TI2V_SHAPES if p.conditioning == "first_frame" else SHAPES)
  want = _unpacked_losses(params, p, samples).mean()
  got = _packed_loss(params, packed_plan, samples)
  print(f"{p.family.name} {p.conditioning}: packed {got:.8g}, unpacked mean {want:.8g}, "
        f"rel. error {abs(got - want) / abs(want):.2e}")
  assert abs(got - want) <= BOUND * abs(want)


def test_one_frame_clip_under_first_frame_is_left_out():
  """TI2V image-to-video: a one-frame clip is all clean image, nothing to learn; the packed loss
  leaves it out (its row-mate's loss alone), not NaN."""
  p, packed_plan = _plan(wan22_ti2v, "I2V")
  params = transformer.init(p.model, jax.random.key(0))
  samples = _samples(p, ((2, 4, 6), (1, 8, 8)))
  alone = _unpacked_losses(params, p, samples[:1])[0]
  got = _packed_loss(params, packed_plan, samples, rows=[[0, 1]])
  assert abs(got - alone) <= BOUND * abs(alone)


# ----------------------------------------------------------------------------------------------
# End to end on a prepared cache of four buckets.


def _config(**fields):
  c = wan21_t2v.get_config("tiny")
  c.update(fields)
  return c


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  clips = clip_fixtures.make_folder(tmp_path_factory.mktemp("clips"), with_bad=False)
  out = str(tmp_path_factory.mktemp("cache") / "c")
  # Two repeats: the two one-frame samples (16 tokens) share a row of 32.
  prepare.run(plan.preparation(_config(job="prepare", train_data_dir=clips, tfrecords_dir=out,
                                       enable_bucket=True, num_repeats=2)))
  return out


def test_packed_run_trains_and_resumes_exactly(cache, tmp_path):
  fields = dict(dataset_type="tfrecord", train_data_dir=cache, pack_sequences=True,
                max_train_steps=6, checkpoint_every=6, precision="HIGHEST",
                global_batch_size=2, write_metrics=True)
  p = plan.make(_config(output_dir=str(tmp_path / "a"), **fields), jax.devices())
  # Buckets 1x8x8 (16 tokens), 2x10x6 and 2x6x10 (30), 2x8x8 (32): rows of 32 tokens, two
  # clips at most; 8 samples in 7 rows, 4 batches of 2 rows.
  assert len(p.data.buckets) == 4 and p.seq_len == 32
  assert p.data.packing.max_segments == 2 and p.data.steps_per_epoch == 4
  assert "packed: rows of 32 tokens" in p.summary()
  whole = train.train(p, jax.devices())
  first = train.train(plan.make(_config(output_dir=str(tmp_path / "b"), **dict(
      fields, max_train_steps=3)), jax.devices()))
  second = train.train(plan.make(_config(output_dir=str(tmp_path / "b"), **fields),
                                 jax.devices()))
  assert len(whole) == 6 and len(first) == 3 and len(second) == 3
  assert all(np.isfinite(whole))
  assert first + second == whole  # bit-exact, across the epoch boundary (step 5)


def test_packed_epochs_hold_every_sample_once_per_repeat():
  _, p = _plan(wan21_t2v, "T2V")  # rows of 32 tokens, batches of 2 rows
  groups = {(1, 8, 8, 16): [0, 0, 1, 1], (2, 4, 6, 16): [2, 2], (2, 8, 8, 16): [3, 3]}
  tokens = {0: 16, 1: 16, 2: 12, 3: 32}
  epochs = []
  for epoch in range(3):
    rows = packing.epoch_rows({k: len(v) for k, v in groups.items()}, (1, 2, 2), 32, p.seed,
                              epoch, shuffle=True)
    assert sorted(j for row in rows for j in row) == list(range(8))  # every slot once
    batches = loader.packed_batches(groups, p, epoch)
    flat = [row for batch in batches for row in batch]
    assert len(batches) == -(-len(rows) // 2) and all(len(b) == 2 for b in batches)
    assert sorted(i for row in flat[:len(rows)] for i in row) == [0, 0, 1, 1, 2, 2, 3, 3]
    assert flat[len(rows):] == flat[:len(flat) - len(rows)]  # the fill: the epoch's first rows
    assert all(sum(tokens[i] for i in row) <= 32 for row in flat)
    epochs.append(batches)
  assert epochs[0] == loader.packed_batches(groups, p, 0)  # a function of (seed, epoch)
  assert epochs[0] != epochs[1]
  plain = dataclasses.replace(p, data=dataclasses.replace(p.data, shuffle=False))
  assert loader.packed_batches(groups, plain, 0) == loader.packed_batches(groups, plain, 2)


def test_packed_stream_resumes_across_epochs_of_different_lengths():
  """Each epoch packs its own order, so epochs differ in length (here 3, 4, 3, 4 batches): a
  restored position finds its epoch and batch again."""
  _, p = _plan(wan21_t2v, "T2V")  # rows of 32 tokens, batches of 2 rows
  # 20-token and 12-token clips: 20 + 12 share a row, 12 + 12 share one, 20 + 20 do not.
  groups = {(1, 8, 10, 16): [0, 1, 2, 3, 4, 5], (2, 4, 6, 16): [6, 7, 8, 9, 10, 11]}
  batches = [len(loader.packed_batches(groups, p, e)) for e in range(4)]
  assert batches == [3, 4, 3, 4]

  def fetch(ids):
    shape = lambda i: next(s for s, members in groups.items() if i in members)
    return [{"latents": np.full(shape(i), float(i), np.float32),
             "text": np.full((1 + i % 3, p.model.text_dim), float(i), np.float32)} for i in ids]

  mesh = sharding.make_mesh(p.ici, p.dcn, jax.devices()[:1])
  total = sum(batches) + 1  # into the fifth epoch
  whole = loader.Stream(p, mesh, groups, fetch)
  seen = [jax.device_get(next(whole)) for _ in range(total)]
  whole.close()
  for cut in (3, total - 2):
    first = loader.Stream(p, mesh, groups, fetch)
    for _ in range(cut):
      next(first)
    state = first.state()
    first.close()
    second = loader.Stream(p, mesh, groups, fetch)
    second.restore(state)
    tail = [jax.device_get(next(second)) for _ in range(total - cut)]
    second.close()
    for got, want in zip(tail, seen[cut:]):
      jax.tree.map(np.testing.assert_array_equal, got, want)
  assert set(seen[0]) == set(batch_lib.shapes(p))
