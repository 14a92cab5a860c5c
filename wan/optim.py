"""AdamW with global-norm clipping and a warmup-then-decay learning-rate schedule.

The learning rate is read at the run's global step, passed to `update` (`step=`), not at a count
of the optimizer's own: the two experts of a Wan 2.2 A14B run each update only on their steps,
and both follow the one schedule of the run.
"""

import dataclasses

import jax
import jax.numpy as jnp
import optax

SCHEDULES = ("constant", "linear", "cosine")


@dataclasses.dataclass(frozen=True)
class Settings:
  """The optimizer of a run (built by the plan)."""
  learning_rate: float
  schedule: str = "constant"  # after warmup: constant | linear | cosine (decay to 0)
  warmup_steps: int = 0
  schedule_steps: int = 1  # warmup + decay; steps past it keep the schedule's last value
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  weight_decay: float = 0.0
  max_grad_norm: float = 0.0  # <= 0: no clipping


def schedule(s: Settings):
  """Linear warmup from 0 over s.warmup_steps, then constant, linear or cosine decay to 0 at
  s.schedule_steps."""
  lr, warmup = s.learning_rate, s.warmup_steps
  decay_steps = max(s.schedule_steps - warmup, 1)
  after = {
      "constant": optax.constant_schedule(lr),
      "linear": optax.linear_schedule(lr, 0.0, decay_steps),
      "cosine": optax.cosine_decay_schedule(lr, decay_steps),
  }[s.schedule]
  if warmup == 0:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), after], [warmup])


def _scale_by_schedule_at_step(lr_schedule) -> optax.GradientTransformationExtraArgs:
  """updates * -lr_schedule(step), `step` given to update (the run's step, from 0)."""
  def init(params):
    del params
    return optax.EmptyState()

  def update(updates, state, params=None, *, step, **extra):
    del params, extra
    lr = lr_schedule(step)
    return jax.tree.map(lambda u: (-lr * u).astype(u.dtype), updates), state
  return optax.GradientTransformationExtraArgs(init, update)


def global_norm(tree) -> jax.Array:
  """The L2 norm of all leaves of `tree` together, float32.

  Each leaf's sum of squares is the dot of the flattened leaf with itself (exact: HIGHEST
  precision, float32 accumulation). XLA CPU runs that as a library dot; a reduction of the
  squared leaf wrote the squares out first and ran 2x slower (docs/performance.md).
  """
  squares = [jax.lax.dot(x.ravel(), x.ravel(), precision=jax.lax.Precision.HIGHEST,
                         preferred_element_type=jnp.float32) for x in jax.tree.leaves(tree)]
  return jnp.sqrt(sum(squares, jnp.zeros((), jnp.float32)))


def _clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
  """optax.clip_by_global_norm with `global_norm`: updates scaled by max_norm / norm when their
  norm is larger."""
  def update(updates, state, params=None):
    del params
    norm = global_norm(updates)
    scale = jnp.where(norm < max_norm, 1.0, max_norm / norm)
    return jax.tree.map(lambda u: (u * scale).astype(u.dtype), updates), state
  return optax.GradientTransformation(optax.init_empty_state, update)


def make(s: Settings) -> optax.GradientTransformationExtraArgs:
  """The optimizer: clip (if max_grad_norm > 0), then AdamW (optax.adamw's order: Adam's
  direction, plus weight decay, times the learning rate). update(grads, state, params, step=)."""
  parts = [_clip_by_global_norm(s.max_grad_norm)] if s.max_grad_norm > 0 else []
  parts += [optax.scale_by_adam(b1=s.b1, b2=s.b2, eps=s.eps),
            optax.add_decayed_weights(s.weight_decay), _scale_by_schedule_at_step(schedule(s))]
  return optax.chain(*parts)
