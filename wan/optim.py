"""AdamW with global-norm clipping and a warmup-then-decay learning-rate schedule."""

import optax


def schedule(plan, kind: str):
  """Linear warmup from 0 over plan.warmup_steps, then constant, linear or cosine decay to 0 at
  plan.schedule_steps."""
  lr, warmup = plan.learning_rate, plan.warmup_steps
  decay_steps = max(plan.schedule_steps - warmup, 1)
  after = {
      "constant": optax.constant_schedule(lr),
      "linear": optax.linear_schedule(lr, 0.0, decay_steps),
      "cosine": optax.cosine_decay_schedule(lr, decay_steps),
  }[kind]
  if warmup == 0:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), after], [warmup])


def make(c, plan) -> optax.GradientTransformation:
  """The optimizer of a run: clip (if max_grad_norm > 0), then AdamW."""
  adamw = optax.adamw(schedule(plan, c.lr_schedule), b1=c.adam_b1, b2=c.adam_b2, eps=c.adam_eps,
                      weight_decay=c.adam_weight_decay)
  if c.max_grad_norm > 0:
    return optax.chain(optax.clip_by_global_norm(c.max_grad_norm), adamw)
  return adamw
