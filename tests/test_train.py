"""The train loop on the tiny configs: sharded == single device, exact resume, overfitting,
every variant's conditioning, and the files a run writes."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import wan21_i2v, wan21_t2v, wan22_i2v, wan22_t2v, wan22_ti2v
from wan import data, train


def _tiny(module=wan21_t2v, **overrides):
  c = module.get_config("tiny")
  c.checkpoint_every = -1
  c.write_metrics = False
  c.global_batch_size = 4
  c.update(overrides)
  return c


def _one_step(c, devices):
  run = train.setup(c, devices)
  state = train.init_state(run)
  batch = next(data.make(c, run.plan, run.mesh))
  with jax.set_mesh(run.mesh):
    new, stats = train.make_step(run)(state, batch)
  return float(stats["loss"]), jax.device_get(new["params"])


@pytest.fixture(scope="module")
def single_device_step():
  c = _tiny(precision="HIGHEST")
  return _one_step(c, jax.devices()[:1])


@pytest.mark.parametrize("mesh", [
    dict(ici_fsdp=8), dict(ici_data=2, ici_fsdp=4), dict(ici_fsdp=2, ici_context=4),
    dict(ici_fsdp=4, ici_tensor=2), dict(ici_data=2, ici_fsdp=1, ici_context=2, ici_tensor=2)])
def test_sharded_step_equals_single_device(single_device_step, mesh):
  want_loss, want_params = single_device_step
  c = _tiny(precision="HIGHEST", **mesh)
  loss, got = _one_step(c, jax.devices())
  assert abs(loss - want_loss) <= 1e-5 * abs(want_loss)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want_params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


@pytest.fixture
def compilation_cache(tmp_path):
  """The three runs below compile the same programs: compile them once."""
  train.use_compilation_cache(str(tmp_path / "jax_cache"))
  yield
  train.use_compilation_cache("")


def test_interrupted_run_resumes_exactly(tmp_path, compilation_cache):
  common = dict(checkpoint_every=8, learning_rate_schedule_steps=6, warmup_steps_fraction=0.5,
                caption_dropout=0.3, write_metrics=True)
  full = train.train(_tiny(max_train_steps=6, output_dir=str(tmp_path / "full"), **common))
  part = str(tmp_path / "part")
  first = train.train(_tiny(max_train_steps=4, output_dir=part, **common))
  resumed = train.train(_tiny(max_train_steps=6, output_dir=part, **common))
  assert len(first) == 4 and len(resumed) == 2
  assert first + resumed == full  # bit-exact
  ckpts = sorted(os.listdir(os.path.join(part, "wan21_t2v_tiny", "checkpoints")))
  assert ckpts == ["2", "4", "6"]
  lines = open(os.path.join(part, "wan21_t2v_tiny", "metrics.jsonl")).read().splitlines()
  assert [json.loads(l)["step"] for l in lines] == [1, 2, 3, 4, 5, 6]
  assert os.listdir(os.path.join(part, "wan21_t2v_tiny", "tensorboard"))


def test_overfits_one_fixed_batch():
  c = _tiny(disable_training_weights=True, global_batch_size=1)
  run = train.setup(c, jax.devices()[:1])
  batch = next(data.make(c, run.plan, run.mesh))
  key = jax.random.key(7)  # the same noise and timesteps every step
  tx = optax.adam(1e-2)
  p = train.init_state(run)["params"]
  opt = tx.init(p)

  @jax.jit
  def step(p, opt):
    loss, grads = jax.value_and_grad(lambda p: train.loss_fn(p, batch, key, run)[0])(p)
    updates, opt = tx.update(grads, opt)
    return optax.apply_updates(p, updates), opt, loss

  losses = []
  for _ in range(200):
    p, opt, loss = step(p, opt)
    losses.append(float(loss))
  assert losses[-1] < losses[0] / 10, (losses[0], losses[-1])


@pytest.mark.parametrize("module, model_type", [
    (wan21_i2v, "I2V"), (wan22_i2v, "I2V"), (wan22_ti2v, "T2V"), (wan22_ti2v, "I2V")])
# Wan 2.1 T2V: the tests above; Wan 2.2 A14B T2V: test_a14b_expert_trains_on_its_side_of_the_boundary.
def test_every_variant_trains(module, model_type):
  losses = train.train(_tiny(module, model_type=model_type, max_train_steps=2), jax.devices()[:2])
  assert len(losses) == 2 and all(np.isfinite(losses))


def test_first_frame_conditioning_keeps_frame_zero_clean():
  c = _tiny(wan22_ti2v, model_type="I2V")
  run = train.setup(c, jax.devices()[:1])
  batch = next(data.make(c, run.plan, run.mesh))
  x_t = jnp.zeros_like(batch["latents"])
  x_in, t, frame_mask = train.model_inputs(run.plan, batch, x_t, jnp.array([0.5] * 4))
  np.testing.assert_array_equal(x_in[:, 0], batch["latents"][:, 0])
  np.testing.assert_array_equal(x_in[:, 1:], 0)
  tokens_per_frame = run.plan.seq_len // run.plan.latent_shape[0]
  np.testing.assert_array_equal(t[:, :tokens_per_frame], 0)
  np.testing.assert_array_equal(t[:, tokens_per_frame:], 500)
  np.testing.assert_array_equal(frame_mask, [False, True])


@pytest.mark.parametrize("expert, low, high", [("high_noise", 0.875, 1.0),
                                               ("low_noise", 0.0, 0.875)])
def test_a14b_expert_trains_on_its_side_of_the_boundary(expert, low, high):
  c = _tiny(wan22_t2v, expert=expert)
  run = train.setup(c, jax.devices()[:1])
  batch = next(data.make(c, run.plan, run.mesh))
  p = train.init_state(run)["params"]
  sigma_of = jax.jit(lambda key: train.loss_fn(p, batch, key, run)[1])
  sigmas = [float(s) for k in range(20) for s in sigma_of(jax.random.key(k))]
  assert low <= min(sigmas) and max(sigmas) <= high


def test_i2v_model_input_layout():
  c = _tiny(wan21_i2v)
  run = train.setup(c, jax.devices()[:1])
  batch = next(data.make(c, run.plan, run.mesh))
  assert batch["image"].shape == (4, 257, run.plan.model.image_dim)
  x_t = jnp.full_like(batch["latents"], 3.0)
  x_in, _, _ = train.model_inputs(run.plan, batch, x_t, jnp.array([0.5] * 4))
  assert x_in.shape[-1] == 36
  np.testing.assert_array_equal(x_in[..., :16], 3.0)  # noisy latents, then mask, then condition
  np.testing.assert_array_equal(x_in[:, 0, ..., 16:20], 1.0)
  np.testing.assert_array_equal(x_in[:, 1:, ..., 16:20], 0.0)
  np.testing.assert_array_equal(x_in[:, 0, ..., 20:], batch["latents"][:, 0])
