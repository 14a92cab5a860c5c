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
from tests.conftest import GOLDEN_DIR
from wan import checkpoint, conditioning, data, metrics, plan, train, transformer


def _tiny(module=wan21_t2v, **overrides):
  c = module.get_config("tiny")
  c.checkpoint_every = -1
  c.write_metrics = False
  c.global_batch_size = 4
  c.update(overrides)
  return c


def _train(c, devices=None):
  devices = jax.devices() if devices is None else devices
  return train.train(plan.make(c, devices), devices)


def _setup(c, devices):
  return train.setup(plan.make(c, devices), devices)


def _one_step(c, devices):
  run = _setup(c, devices)
  state = train.init_state(run)
  batch = next(data.make(run.plan, run.mesh))
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


def test_interrupted_run_resumes_exactly(tmp_path):
  common = dict(checkpoint_every=8, learning_rate_schedule_steps=6, warmup_steps_fraction=0.5,
                caption_dropout=0.3, write_metrics=True)
  full = _train(_tiny(max_train_steps=6, output_dir=str(tmp_path / "full"), **common))
  part = str(tmp_path / "part")
  first = _train(_tiny(max_train_steps=4, output_dir=part, **common))
  resumed = _train(_tiny(max_train_steps=6, output_dir=part, **common))
  assert len(first) == 4 and len(resumed) == 2
  assert first + resumed == full  # bit-exact
  ckpts = sorted(os.listdir(os.path.join(part, "wan21_t2v_tiny", "checkpoints")))
  assert ckpts == ["2", "4", "6"]
  lines = open(os.path.join(part, "wan21_t2v_tiny", "metrics.jsonl")).read().splitlines()
  assert [json.loads(l)["step"] for l in lines] == [1, 2, 3, 4, 5, 6]
  assert os.listdir(os.path.join(part, "wan21_t2v_tiny", "tensorboard"))


def test_overfits_one_fixed_batch():
  c = _tiny(disable_training_weights=True, global_batch_size=1)
  run = _setup(c, jax.devices()[:1])
  batch = next(data.make(run.plan, run.mesh))
  key = jax.random.key(7)  # the same noise and timesteps every step
  tx = optax.adam(1e-2)
  p = train.init_state(run)["params"]
  opt = tx.init(p)

  @jax.jit
  def step(p, opt):
    loss, grads = jax.value_and_grad(lambda p: train.loss_fn(p, batch, key, run.plan)[0])(p)
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
  losses = _train(_tiny(module, model_type=model_type, max_train_steps=2), jax.devices()[:2])
  assert len(losses) == 2 and all(np.isfinite(losses))


def test_first_frame_conditioning_keeps_frame_zero_clean():
  c = _tiny(wan22_ti2v, model_type="I2V")
  run = _setup(c, jax.devices()[:1])
  batch = next(data.make(run.plan, run.mesh))
  x_t = jnp.zeros_like(batch["latents"])
  x_in, t, frame_mask = conditioning.model_inputs(
      "first_frame", x_t, jnp.array([500.0] * 4), run.plan.model.patch_size,
      conditioning.from_batch("first_frame", batch))
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
  run = _setup(c, jax.devices()[:1])
  batch = next(data.make(run.plan, run.mesh))
  p = train.init_state(run)["params"]
  sigma_of = jax.jit(lambda key: train.loss_fn(p, batch, key, run.plan)[1])
  sigmas = [float(s) for k in range(20) for s in sigma_of(jax.random.key(k))]
  assert low <= min(sigmas) and max(sigmas) <= high


def test_i2v_model_input_layout():
  c = _tiny(wan21_i2v)
  run = _setup(c, jax.devices()[:1])
  batch = next(data.make(run.plan, run.mesh))
  assert batch["image"].shape == (4, 257, run.plan.model.image_dim)
  x_t = jnp.full_like(batch["latents"], 3.0)
  x_in, _, _ = conditioning.model_inputs("concat", x_t, jnp.array([500.0] * 4),
                                         run.plan.model.patch_size,
                                         conditioning.from_batch("concat", batch))
  assert x_in.shape[-1] == 36
  np.testing.assert_array_equal(x_in[..., :16], 3.0)  # noisy latents, then mask, then condition
  np.testing.assert_array_equal(x_in[:, 0, ..., 16:20], 1.0)
  np.testing.assert_array_equal(x_in[:, 1:, ..., 16:20], 0.0)
  np.testing.assert_array_equal(x_in[:, 0, ..., 20:], batch["latents"][:, 0])


def _bell_numpy(sigma, s):
  u = np.linspace(1.0, 0.0, 1000, endpoint=False)
  y = np.exp(-2.0 * (s * u / (1 + (s - 1) * u) - 0.5) ** 2)
  return (np.exp(-2.0 * (sigma - 0.5) ** 2) - y.min()) / (y - y.min()).mean()


@pytest.mark.parametrize("module, model_type, bell", [
    (wan21_t2v, "T2V", True), (wan21_i2v, "I2V", True), (wan22_ti2v, "I2V", False),
    (wan22_i2v, "I2V", True)])
def test_assembled_loss_matches_float64_numpy(module, model_type, bell):
  """The loss the step optimises, against the same formula in float64 NumPy: x_t, the model
  input (36-channel concat, or TI2V's clean first frame with timestep 0), the caption drop, the
  velocity target, the first-frame loss mask and the bell weighting. The network itself is the
  one shared piece (called on the NumPy-built input)."""
  c = _tiny(module, model_type=model_type, precision="HIGHEST", disable_training_weights=not bell,
            caption_dropout=0.5)
  run = _setup(c, jax.devices()[:1])
  p_ = run.plan
  batch = jax.device_get(next(data.make(p_, run.mesh)))
  params = jax.device_get(train.init_state(run)["params"])
  rng = np.random.default_rng(0)
  x0 = batch["latents"].astype(np.float64)
  sigma = np.array([0.05, 0.3, 0.7, 0.95])
  noise = rng.standard_normal(x0.shape)
  drop = np.array([True, False, False, True])
  got = train.flow_loss(params, batch, jnp.asarray(sigma, jnp.float32),
                        jnp.asarray(noise, jnp.float32), p_, drop=jnp.asarray(drop))

  s = sigma[:, None, None, None, None]
  x_in = (1 - s) * x0 + s * noise
  t = 1000.0 * sigma
  frames = np.ones(x0.shape[1], bool)
  if p_.conditioning == "concat":
    x_in = np.concatenate([x_in, batch["cond_mask"], batch["cond"]], axis=-1)
  elif p_.conditioning == "first_frame":
    x_in[:, 0] = x0[:, 0]
    per_frame = p_.seq_len // x0.shape[1]
    t = t[:, None] * (np.arange(p_.seq_len) >= per_frame)
    frames[0] = False
  text = np.where(drop[:, None, None], 0.0, batch["text"])
  mask = batch["text_mask"] | drop[:, None]
  pred = np.asarray(transformer.forward(
      params, p_.model, jnp.asarray(x_in, jnp.float32), jnp.asarray(t, jnp.float32),
      jnp.asarray(text, jnp.float32), batch.get("image"), text_mask=jnp.asarray(mask),
      options=p_.options), np.float64)
  err = (pred - (noise - x0)) ** 2
  per_sample = err[:, frames].mean(axis=(1, 2, 3, 4))
  if bell:
    per_sample = per_sample * _bell_numpy(sigma, p_.flow.shift)
  want = per_sample.mean()
  print(f"assembled loss rel. error {abs(float(got) - want) / abs(want):.2e}")
  assert abs(float(got) - want) <= 1e-5 * abs(want), (float(got), want)


def test_next_step_is_dispatched_before_metrics_are_read(monkeypatch):
  """The host never waits between steps: step N+1 is queued before step N's stats are read
  (except at a checkpoint, whose metrics are written before it)."""
  events = []
  make_step = train.make_step

  def recording_make_step(run):
    step_fn = make_step(run)

    def dispatch(state, batch):
      events.append(("dispatch", len([e for e in events if e[0] == "dispatch"])))
      return step_fn(state, batch)
    return dispatch

  report = metrics.Reporter.__call__
  monkeypatch.setattr(train, "make_step", recording_make_step)
  monkeypatch.setattr(metrics.Reporter, "__call__",
                      lambda self, step, *rest: (events.append(("read", step)),
                                                 report(self, step, *rest)))
  losses = _train(_tiny(max_train_steps=5), jax.devices()[:1])
  assert len(losses) == 5
  order = [e for e in events]
  for n in range(4):
    assert order.index(("dispatch", n + 1)) < order.index(("read", n)), order


def test_metrics_are_on_disk_before_each_checkpoint(tmp_path, monkeypatch):
  run_dir = tmp_path / "wan21_t2v_tiny"
  seen = {}
  save = checkpoint.Checkpointer.save

  def checking_save(self, step, state, data_state):
    rows = [json.loads(l) for l in open(run_dir / "metrics.jsonl")]
    seen[step] = [r["step"] for r in rows]
    return save(self, step, state, data_state)

  monkeypatch.setattr(checkpoint.Checkpointer, "save", checking_save)
  _train(_tiny(max_train_steps=5, checkpoint_every=8, write_metrics=True,
               tensorboard_flush_period=100, output_dir=str(tmp_path)), jax.devices()[:1])
  assert seen == {2: [1, 2], 4: [1, 2, 3, 4], 5: [1, 2, 3, 4, 5]}


def test_resume_without_a_saved_optimizer_state(tmp_path, monkeypatch):
  """The params come back exactly (the first resumed loss equals the uninterrupted run's) and
  the optimizer starts afresh; a resume reads the checkpoint, not the pretrained weights."""
  common = dict(checkpoint_every=8, save_optimizer=False, learning_rate_schedule_steps=3,
                pretrained_model_name_or_path=os.path.join(GOLDEN_DIR, "transformer_t2v"))
  full = _train(_tiny(max_train_steps=3, output_dir=str(tmp_path / "full"), **common),
                jax.devices()[:1])
  part = str(tmp_path / "part")
  first = _train(_tiny(max_train_steps=2, output_dir=part, **common), jax.devices()[:1])

  def no_load(*args, **kwargs):
    raise AssertionError("a resumed run loaded the pretrained weights")

  monkeypatch.setattr(transformer, "load", no_load)
  resumed = _train(_tiny(max_train_steps=3, output_dir=part, **common), jax.devices()[:1])
  assert first == full[:2] and len(resumed) == 1
  assert resumed[0] == full[2]
