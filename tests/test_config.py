"""Config validation: every error comes before any work and says what to change; docs/config.md
covers every field."""

import os
import re

import pytest

from configs import base, wan21_t2v, wan22_t2v, wan22_ti2v
from wan import config


def _plan(module=wan21_t2v, devices=8, processes=1, **overrides):
  c = module.get_config("tiny")
  c.update(overrides)
  return config.plan(c, devices, processes)


def test_tiny_plans_derive_latent_shapes_and_batches():
  p = _plan()
  assert p.latent_shape == (2, 8, 8, 16) and p.seq_len == 2 * 4 * 4
  assert p.global_batch == 2 and p.ici == dict(data=1, fsdp=8, context=1, tensor=1)
  p = _plan(wan22_ti2v)
  assert p.latent_shape == (2, 4, 4, 48)  # Wan 2.2 VAE: 16x spatial, 48 channels


@pytest.mark.parametrize("overrides, error, message", [
    (dict(ici_fsdp=3), ValueError, "multiplies to 3 but there are 8 devices"),
    (dict(ici_fsdp=-1, ici_tensor=3), ValueError, "do not divide 8 devices|does not divide 8"),
    (dict(ici_fsdp=4, ici_tensor=2, model_preset="tiny-t2v", weights_dtype="float32"),
     None, None),
    (dict(ici_fsdp=1, ici_tensor=8), ValueError, "tensor parallelism 8 does not divide 2 heads; "
     "use 1 or 2"),
    (dict(global_batch_size=0, per_device_batch_size=0.3), ValueError,
     r"0.3 x 8 devices = 2.4 is not a whole global batch"),
    (dict(global_batch_size=3, ici_data=2, ici_fsdp=-1), ValueError,
     "does not split over data parallelism 2"),
    (dict(num_frames=8), ValueError, "num_frames=8 must be 4k\\+1.*use 5 or 9"),
    (dict(height=72), ValueError, "height=72 must be divisible by 16.*use 64 or 80"),
    (dict(width=100), ValueError, "width=100 must be divisible by 16"),
    (dict(ici_fsdp=2, ici_context=4, height=48, width=48), ValueError,
     "context parallelism 4 does not divide the 18 video tokens"),
    (dict(attention="magic"), ValueError, "attention='magic' is not one of"),
    (dict(remat_policy="SOME"), ValueError, "remat_policy='SOME' is not one of"),
    (dict(flash_block_sizes=dict(block_z=256)), ValueError, "unknown block size names"),
    (dict(model_type="V2V"), ValueError, "model_type='V2V'"),
    (dict(precision="LOW"), ValueError, "precision='LOW'"),
    (dict(model_preset="huge"), ValueError, "model_preset='huge' is not one of"),
    (dict(names_which_can_be_saved=["qkv"]), ValueError, "unknown checkpoint names"),
    (dict(model_type="I2V"), ValueError, "needs an image-to-video model"),
    (dict(max_train_steps=0), ValueError, "set max_train_steps"),
    (dict(enable_lora=True), NotImplementedError, "enable_lora=True is not implemented yet"),
    (dict(eval_every=10), NotImplementedError, "eval_every=10 is not implemented yet"),
    (dict(use_qwix_quantization=True), NotImplementedError, "not implemented yet"),
    (dict(dataset_type="tfrecord"), NotImplementedError, "dataset_type='tfrecord'"),
    (dict(mesh_axes=["fsdp", "data", "context", "tensor"]), ValueError, "mesh_axes must be"),
])
def test_validation_errors_say_what_to_change(overrides, error, message):
  if error is None:
    _plan(**overrides)
    return
  with pytest.raises(error, match=message):
    _plan(**overrides)


def test_attention_options_reach_the_model():
  m = _plan(attention="ring", split_head_dim=False, attention_sharding_uniform=False,
            flash_min_seq_length=64, flash_block_sizes=dict(block_q=256, block_kv=128)).model
  assert (m.attention, m.split_head_dim, m.attention_sharding_uniform) == ("ring", False, False)
  assert m.flash_min_seq_length == 64
  assert m.flash_block_sizes == (("block_kv", 128), ("block_q", 256))


def test_t2v_model_with_i2v_channels_is_refused():
  with pytest.raises(ValueError, match="set model_type=I2V"):
    _plan(model_preset="tiny-i2v")


def test_batch_must_split_over_hosts():
  with pytest.raises(ValueError, match="does not split over 4 hosts"):
    _plan(global_batch_size=2, devices=8, processes=4, ici_fsdp=-1, dcn_data=1, dcn_fsdp=-1)


def test_fractional_per_device_batch():
  p = _plan(global_batch_size=0, per_device_batch_size=0.25, ici_fsdp=2, ici_context=4)
  assert p.global_batch == 2


def test_a14b_experts_split_sigma_at_the_boundary():
  assert _plan(wan22_t2v).sigma_range == (0.875, 1.0)
  assert _plan(wan22_t2v, expert="low_noise").sigma_range == (0.0, 0.875)
  assert _plan(wan22_t2v, boundary=0.5).sigma_range == (0.5, 1.0)
  with pytest.raises(ValueError, match="expert='both'"):
    _plan(wan22_t2v, expert="both")


def test_steps_schedule_and_scaled_lr():
  p = _plan(max_train_steps=100, warmup_steps_fraction=0.1, scale_lr=True, learning_rate=1e-4,
            global_batch_size=8)
  assert (p.num_steps, p.schedule_steps, p.warmup_steps) == (100, 100, 10)
  assert p.learning_rate == pytest.approx(8e-4)
  p = _plan(max_train_steps=0, synthetic_num_samples=10, num_train_epochs=3)
  assert p.num_steps == 3 * 5


def test_docs_table_covers_every_field():
  doc = open(os.path.join(os.path.dirname(__file__), "..", "docs", "config.md")).read()
  documented = set(re.findall(r"^\|[^|]*\| `([a-z0-9_]+)` \|", doc, re.M))
  fields = set(base.get_config().keys())
  assert fields - documented == set(), "fields missing from docs/config.md"
  assert documented - fields == set(), "docs/config.md names fields that do not exist"
