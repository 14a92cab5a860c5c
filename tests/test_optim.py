"""Learning-rate schedules against their closed forms (float64 NumPy), and gradient clipping."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from wan import optim

LR, WARMUP, TOTAL = 3e-4, 10, 50


def _closed_form(kind, step):
  step = np.asarray(step, np.float64)
  decay = np.clip((step - WARMUP) / (TOTAL - WARMUP), 0.0, 1.0)
  after = {"constant": np.full_like(step, LR), "linear": LR * (1.0 - decay),
           "cosine": LR * 0.5 * (1.0 + np.cos(np.pi * decay))}[kind]
  return np.where(step < WARMUP, LR * step / WARMUP, after)


@pytest.mark.parametrize("kind", optim.SCHEDULES)
def test_schedules_match_closed_forms(kind):
  s = optim.Settings(learning_rate=LR, schedule=kind, warmup_steps=WARMUP, schedule_steps=TOTAL)
  steps = np.arange(0, TOTAL + 20)  # past the end: the last value (0 for the decays)
  got = np.array([float(optim.schedule(s)(jnp.int32(i))) for i in steps])
  np.testing.assert_allclose(got, _closed_form(kind, steps), rtol=1e-5, atol=1e-12)


def test_no_warmup_starts_at_the_peak():
  s = optim.Settings(learning_rate=LR, schedule="cosine", warmup_steps=0, schedule_steps=TOTAL)
  assert float(optim.schedule(s)(0)) == pytest.approx(LR)
  assert float(optim.schedule(s)(TOTAL // 2)) == pytest.approx(LR / 2, rel=1e-5)


def _adam_numpy(grads, clip, lr=0.1, b1=0.9, b2=0.999, eps=1e-8):
  """float64 AdamW (no decay) on globally norm-clipped gradients: the parameter after each step."""
  w, m, v, out = np.zeros(4), np.zeros(4), np.zeros(4), []
  for t, g in enumerate(grads, 1):
    norm = np.linalg.norm(g)
    if clip > 0 and norm > clip:
      g = g * clip / norm
    m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
    w = w - lr * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
    out.append(w)
  return np.array(out)


@pytest.mark.parametrize("clip", [1.0, 0.0])
def test_clipped_adamw_matches_numpy(clip):
  grads = [np.full(4, 100.0), np.array([0.5, -0.5, 0.25, 1.0]), np.full(4, -3.0)]
  tx = optim.make(optim.Settings(learning_rate=0.1, max_grad_norm=clip))
  params = {"w": jnp.zeros(4)}
  state, got = tx.init(params), []
  for step, g in enumerate(grads):
    updates, state = tx.update({"w": jnp.asarray(g, jnp.float32)}, state, params, step=step)
    params = optax.apply_updates(params, updates)
    got.append(np.asarray(params["w"]))
  np.testing.assert_allclose(got, _adam_numpy(grads, clip), rtol=1e-5, atol=1e-7)


def test_adamw_follows_the_run_step_and_equals_optax_adamw():
  s = optim.Settings(learning_rate=LR, schedule="cosine", warmup_steps=WARMUP, schedule_steps=TOTAL,
                     weight_decay=0.1)
  ours, theirs = optim.make(s), optax.adamw(optim.schedule(s), weight_decay=0.1)
  params = {"w": jnp.arange(4.0)}
  a, b = ours.init(params), theirs.init(params)
  for step in range(15):
    g = {"w": jnp.sin(jnp.arange(4.0) + step)}
    ua, a = ours.update(g, a, params, step=step)
    ub, b = theirs.update(g, b, params)
    np.testing.assert_allclose(ua["w"], ub["w"], rtol=1e-6, atol=1e-12)
  # Only the step given sets the rate: an optimizer updated on steps 40.. of a run decays there.
  late, _ = ours.update(g, ours.init(params), params, step=TOTAL)
  np.testing.assert_array_equal(late["w"], 0.0)


def test_global_norm_matches_float64_over_mixed_leaves():
  rng = np.random.default_rng(0)
  tree = {"a": jnp.asarray(rng.normal(size=(8, 3, 5)) * 30, jnp.float32),
          "b": [jnp.asarray(rng.normal(size=(7,)), jnp.float32), jnp.zeros((0, 2))],
          "c": jnp.asarray(rng.normal(size=(4, 4)), jnp.bfloat16)}
  want = np.sqrt(sum(np.sum(np.asarray(x, np.float64) ** 2) for x in jax.tree.leaves(tree)))
  got = optim.global_norm(tree)
  assert got.dtype == jnp.float32
  assert float(got) == pytest.approx(want, rel=1e-6)
  assert float(optim.global_norm({"x": jnp.array([jnp.inf, 1.0])})) == np.inf
