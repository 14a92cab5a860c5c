"""AdamW with global-norm clipping and a warmup-then-decay learning-rate schedule."""

import dataclasses

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


def make(s: Settings) -> optax.GradientTransformation:
  """The optimizer: clip (if max_grad_norm > 0), then AdamW."""
  adamw = optax.adamw(schedule(s), b1=s.b1, b2=s.b2, eps=s.eps, weight_decay=s.weight_decay)
  if s.max_grad_norm > 0:
    return optax.chain(optax.clip_by_global_norm(s.max_grad_norm), adamw)
  return adamw
