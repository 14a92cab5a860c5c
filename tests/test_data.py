"""Synthetic data: samples are a function of (seed, index), batches are global arrays sharded over
the batch, and a restored position continues the stream exactly."""

import jax
import numpy as np

from configs import wan21_i2v, wan21_t2v
from wan import data, plan as plan_lib, sharding


def _data(module=wan21_t2v, devices=8, **overrides):
  c = module.get_config("tiny")
  c.global_batch_size = 8
  c.update(overrides)
  plan = plan_lib.make(c, jax.devices()[:devices])
  mesh = sharding.make_mesh(plan.ici, plan.dcn, jax.devices()[:devices])
  return c, plan, mesh, data.make(plan, mesh)


def test_batches_are_global_sharded_and_restorable():
  _, plan, _, it = _data(ici_data=2, ici_fsdp=4)
  first, second = next(it), next(it)
  f, h, w, ch = plan.latent_shape
  assert first["latents"].shape == (8, f, h, w, ch)
  assert first["text"].shape == (8, plan.text_len, plan.model.text_dim)
  assert first["latents"].sharding.spec[0] == ("data", "fsdp")  # rows over the batch axes
  # Caption padding: the text states are zero exactly where the mask is False.
  text, mask = np.asarray(first["text"]), np.asarray(first["text_mask"])
  assert mask[:, 0].all() and (text[~mask] == 0).all() and (text[mask] != 0).any()
  state = it.state()
  assert state == {"next_sample": 16}
  third = next(it)
  _, _, _, fresh = _data(ici_data=2, ici_fsdp=4)
  fresh.restore(state)
  np.testing.assert_array_equal(next(fresh)["latents"], third["latents"])
  assert not np.array_equal(np.asarray(second["latents"]), np.asarray(third["latents"]))


def test_same_samples_on_any_mesh_and_finite_sets_repeat():
  _, _, _, one = _data(devices=1, synthetic_num_samples=4)
  _, _, _, eight = _data(ici_fsdp=8, synthetic_num_samples=4)
  a, b = next(one), next(eight)
  np.testing.assert_array_equal(a["latents"], b["latents"])
  np.testing.assert_array_equal(a["latents"][:4], a["latents"][4:])  # 4 samples, then again


def test_overrides_and_i2v_conditioning():
  _, plan, _, it = _data(wan21_i2v, synthetic_override_num_frames=9,
                         synthetic_override_max_sequence_length=8)
  batch = next(it)
  assert plan.latent_shape[0] == 3 and batch["text"].shape[1] == 8
  assert batch["image"].shape == (8, 257, plan.model.image_dim)
  cond, latents = np.asarray(batch["cond"]), np.asarray(batch["latents"])
  np.testing.assert_array_equal(cond[:, 0], latents[:, 0])
  assert (cond[:, 1:] == 0).all()
  assert (np.asarray(batch["cond_mask"])[:, 0] == 1).all()


def test_batch_layout_is_declared_once():
  _, plan, mesh, it = _data(wan21_i2v)
  batch = next(it)
  abstract = data.batch.abstract(plan, mesh)
  assert set(batch) == set(abstract) == {"latents", "text", "text_mask", "cond", "cond_mask",
                                         "image"}
  for k, a in abstract.items():
    assert batch[k].shape == a.shape and batch[k].dtype == a.dtype, k
    assert batch[k].sharding.is_equivalent_to(a.sharding, len(a.shape)), k
