"""The Wan samplers (UniPC, Euler, DPM-Solver++ 2M) as pure functions, equal to diffusers'.

Flow matching: the model predicts the velocity v = noise - x0 along x = (1 - sigma) x0 + sigma
noise, so each step's clean estimate is x0 = x - sigma v. All three samplers move the sample by
linear combinations of the current input and clean estimates, with weights that depend only on the
step index; `schedule` computes them once on the host in float64 and `step` applies them:

    x0_i   = x_i - sigma_i v_i
    x_i   <- corrector[i] . (x_{i-1}, x0_{i-1}, x0_{i-2}, x0_i)   (unipc, from step 1 on)
    x_i+1  = predictor[i] . (x_i, x0_i, x0_{i-1})

The first-order row (sigma_{i+1} / sigma_i, 1 - sigma_{i+1} / sigma_i, 0) is DDIM, DPM-Solver++(1)
and the Euler step x + (sigma_{i+1} - sigma_i) v at once; it is all of `euler`, and the first and
last step of the two multistep samplers (the last lands on sigma 0 with the clean estimate).

  unipc  diffusers' UniPCMultistepScheduler as Wan's diffusers roots configure it (flow sigmas,
         order 2, bh2, predict_x0, lower_order_final, final sigma 0, corrector on every step).
  euler  diffusers' FlowMatchEulerDiscreteScheduler(shift=...), no dynamic shifting.
  dpm++  DPM-Solver++ 2M, midpoint, lower_order_final (Wan-AI's FlowDPMSolverMultistepScheduler;
         diffusers' DPMSolverMultistepScheduler with flow sigmas).

diffusers' schedules are reproduced to the bit, float32 roundings included (see `_flow_sigmas`,
`_euler_sigmas`); the step math is float64 on the host, the array math stays in the sample's dtype.
"""

import dataclasses
import json
import numbers

import jax
import jax.numpy as jnp
import numpy as np

from wan import flow
from wan.errors import ConfigError

SAMPLERS = ("unipc", "euler", "dpm++")
# What each sampler carries from one step to the next (the terms its weights refer to).
_HISTORY = {"unipc": ("input_prev", "x0_prev", "x0_prev2"), "euler": (), "dpm++": ("x0_prev",)}


# eq=False: numpy fields make field-wise equality ambiguous; identity hashing lets a Schedule be a
# static argument of jit.
@dataclasses.dataclass(frozen=True, eq=False)
class Schedule:
  """A sampler's whole run, host-side float64; N steps."""
  sampler: str
  sigmas: np.ndarray     # (N + 1,) the noise level of each step's input, then the final 0
  timesteps: np.ndarray  # (N,) what the model is given (diffusers' scheduler.timesteps, 0..1000)
  predictor: np.ndarray  # (N, 3) weights of (input, x0 now, x0 one step back): the next sample
  corrector: np.ndarray  # (N, 4) weights of (previous input, x0 one back, x0 two back, x0 now):
  #                        this step's corrected input (unipc, rows 1..N-1; zeros elsewhere)


def check(sampler, num_steps, shift, num_train_timesteps=1000):
  """Raises ConfigError (a ValueError) naming a bad sampler, step count, shift or train steps."""
  if sampler not in SAMPLERS:
    raise ConfigError(f"unknown sampler {sampler!r}; use one of {', '.join(SAMPLERS)}")
  if isinstance(num_steps, bool) or not isinstance(num_steps, numbers.Integral) or num_steps < 1:
    raise ConfigError(f"num_steps must be an integer >= 1, got {num_steps!r}")
  if (isinstance(shift, bool) or not isinstance(shift, numbers.Real) or not np.isfinite(shift)
      or shift <= 0):
    raise ConfigError(f"shift must be a positive number (Wan uses 3.0 to 12.0), got {shift!r}")
  if (isinstance(num_train_timesteps, bool) or not isinstance(num_train_timesteps, numbers.Integral)
      or num_train_timesteps < 2):
    raise ConfigError(f"num_train_timesteps must be an integer >= 2 (Wan uses 1000), "
                      f"got {num_train_timesteps!r}")


def _flow_sigmas(sampler, n, shift, t_train):
  """unipc / dpm++: (sigmas (n + 1,), timesteps (n,)) as diffusers' flow-sigma schedules give them.

  Both shift an evenly spaced grid, but different ones: UniPC's starts at 1 (nudged to 1 - 1e-6 so
  that log(1 - sigma) stays finite), DPM's at 1 - 1/t_train. The timesteps are the float64 sigmas
  times t_train truncated to integers (diffusers casts them to int64); the sigmas themselves are
  kept at float32 precision, as diffusers stores them.
  """
  grid = np.linspace(1.0, 1.0 / t_train, n + 1)
  if sampler == "unipc":
    sigmas = flow.shift(grid[:-1], shift)
    if abs(sigmas[0] - 1.0) < 1e-6:
      sigmas[0] -= 1e-6
  else:
    sigmas = flow.shift(1.0 - grid, shift)[::-1][:-1]
  timesteps = np.trunc(sigmas * t_train)
  return np.append(sigmas.astype(np.float32).astype(np.float64), 0.0), timesteps


def _euler_sigmas(n, shift, t_train):
  """euler: (sigmas (n + 1,), timesteps (n,)) as FlowMatchEulerDiscreteScheduler gives them.

  Its end points are the shifted training schedule's first and last sigma, computed in float32;
  the n sigmas between them are spaced evenly and shifted a second time (so the last one is
  shift(shift(1 / t_train)), not shift(1 / t_train)), then stored in float32, and the timesteps are
  those float32 sigmas times t_train in float32 (not integers).
  """
  f32 = np.float32

  def shift32(u):
    return f32(shift) * u / (f32(1.0) + f32(shift - 1.0) * u)

  sigma_max, sigma_min = shift32(f32(1.0)), shift32(f32(1.0) / f32(t_train))
  spaced = np.linspace(float(sigma_max) * t_train, float(sigma_min) * t_train, n) / t_train
  sigmas = flow.shift(spaced, shift).astype(np.float32)
  timesteps = (sigmas * f32(t_train)).astype(np.float64)
  return np.append(sigmas.astype(np.float64), 0.0), timesteps


def _log_snr(sigmas):
  """lambda = log((1 - sigma) / sigma) of the multistep solvers; (N,) for sigmas in (0, 1)."""
  return np.log(1.0 - sigmas) - np.log(sigmas)


def _predictor_row(sigmas, lam, i, order):
  """Weights of (x_i, x0_i, x0_{i-1}) for the step sigma_i -> sigma_{i+1}.

  Order 1 is the exact exponential-integrator step with x0 held constant over the interval. Order 2
  is DPM-Solver++(2M)'s midpoint rule: x0 extrapolated by (x0_i - x0_{i-1}) / (2 r), r the previous
  log-SNR step over this one. UniPC's order-2 predictor (bh2, rho fixed at 1/2) is the same step.
  """
  # -alpha_{i+1} (e^-h - 1) in closed form, which needs no log-SNR: it holds at Euler's first
  # sigma of 1 and at the final sigma of 0 alike.
  c = (sigmas[i] - sigmas[i + 1]) / sigmas[i]
  d = 0.5 * (lam[i + 1] - lam[i]) / (lam[i] - lam[i - 1]) if order == 2 else 0.0
  return [sigmas[i + 1] / sigmas[i], c * (1.0 + d), -c * d]


def _corrector_row(sigmas, lam, i, order):
  """UniC's weights of (x_{i-1}, x0_{i-1}, x0_{i-2}, x0_i): step i - 1 solved again.

  The predictor could only extrapolate x0 over sigma_{i-1} -> sigma_i; once the model has been
  evaluated at the predicted x_i, its clean estimate x0_i is known at the far end of that interval,
  so the step is redone with it (one order more accurate) and the next step starts from the result.
  The model is not evaluated again: the same x0_i serves the next predictor. `order` is the one the
  predictor used on that interval.
  """
  c = (sigmas[i - 1] - sigmas[i]) / sigmas[i - 1]  # = -alpha_i B(h), bh2's B(h) = e^-h - 1
  if order == 1:
    back, now = 0.0, 0.5  # diffusers' simplified order-1 corrector: the trapezoid rule
  else:
    # rho solves [[1, 1], [r, 1]] rho = b, b_k = k! phi_{k+1}(-h) / B(h) with the exponential
    # integrator's phi functions, r the previous log-SNR step over this one.
    hh = lam[i - 1] - lam[i]
    b_h = np.expm1(hh)
    g1 = b_h / hh - 1.0
    g2 = g1 / hh - 0.5
    b1, b2 = g1 / b_h, 2.0 * g2 / b_h
    r = (lam[i - 2] - lam[i - 1]) / -hh
    back, now = (b1 - b2) / (1.0 - r) / r, (b2 - r * b1) / (1.0 - r)
  # x0 over the interval: x0_{i-1} + back (x0_{i-2} - x0_{i-1}) + now (x0_i - x0_{i-1}).
  return [sigmas[i] / sigmas[i - 1], c * (1.0 - back - now), c * back, c * now]


def schedule(sampler: str, num_steps: int, shift: float,
             num_train_timesteps: int = 1000) -> Schedule:
  """The sigmas, timesteps and per-step weights of `num_steps` steps of `sampler`."""
  check(sampler, num_steps, shift, num_train_timesteps)
  n, shift = int(num_steps), float(shift)
  if sampler == "euler":
    sigmas, timesteps = _euler_sigmas(n, shift, num_train_timesteps)
  else:
    sigmas, timesteps = _flow_sigmas(sampler, n, shift, num_train_timesteps)
  # Warm-up from order 1 and lower_order_final: the first step has no history, and the last one,
  # landing on sigma 0 (log-SNR +inf), is the first-order step.
  orders = [1 if sampler == "euler" else min(2, n - i, i + 1) for i in range(n)]
  lam = None if sampler == "euler" else _log_snr(sigmas[:-1])  # Euler starts at sigma 1
  predictor = np.array([_predictor_row(sigmas, lam, i, orders[i]) for i in range(n)])
  corrector = np.zeros((n, 4))
  if sampler == "unipc":
    for i in range(1, n):
      corrector[i] = _corrector_row(sigmas, lam, i, orders[i - 1])
  for a in (sigmas, timesteps, predictor, corrector):
    a.setflags(write=False)
  return Schedule(sampler, sigmas, timesteps, predictor, corrector)


def init(schedule: Schedule, sample) -> dict:
  """The state before step 0: the sampler's history, as zeros like `sample` (any shape).

  unipc {"input_prev", "x0_prev", "x0_prev2"}, dpm++ {"x0_prev"}, euler {}; NumPy arrays for a
  NumPy sample, jax arrays otherwise.
  """
  zeros_like = jnp.zeros_like if isinstance(sample, jax.Array) else np.zeros_like
  return {name: zeros_like(sample) for name in _HISTORY[schedule.sampler]}


def _combine(weights, arrays):
  """sum_k weights[k] * arrays[k] over the non-zero weights; Python-float weights keep the dtype."""
  total = None
  for w, a in zip(weights, arrays):
    if w != 0.0:
      term = float(w) * a
      total = term if total is None else total + term
  return total


def step(schedule: Schedule, state: dict, i: int, model_output, sample):
  """Denoising step i (0 <= i < N): (next sample, next state).

  sample: the step's input at sigmas[i] (any shape); model_output: the model's velocity at
  (sample, timesteps[i]), same shape; state: `init`'s or the previous step's. NumPy or jax arrays
  (inside jit too); `i` must be a Python int, since it selects host-side weights.
  """
  n = len(schedule.timesteps)
  if isinstance(i, bool) or not isinstance(i, numbers.Integral):
    raise TypeError(f"step index must be a Python int (it selects host-side weights), got {i!r}; "
                    "run the sampling loop in Python")
  if not 0 <= i < n:
    raise ValueError(f"step index {i} is outside this {n}-step schedule; use 0 to {n - 1}")
  x0 = sample - float(schedule.sigmas[i]) * model_output
  if schedule.sampler == "unipc" and i > 0:
    # The model output was taken at the uncorrected sample; x0 stays the estimate computed from it.
    sample = _combine(schedule.corrector[i],
                      (state["input_prev"], state["x0_prev"], state["x0_prev2"], x0))
  next_sample = _combine(schedule.predictor[i], (sample, x0, state.get("x0_prev")))
  history = {"input_prev": sample, "x0_prev": x0, "x0_prev2": state.get("x0_prev")}
  return next_sample, {name: history[name] for name in state}


# Per diffusers class: our sampler, the key holding the shift, and every setting that changes the
# result with (diffusers' default, the values reproduced here). Settings absent here (the beta
# schedule, timestep_spacing, steps_offset, ...) have no effect once flow sigmas are used.
_CONFIGS = {
    "UniPCMultistepScheduler": ("unipc", "flow_shift", {
        "prediction_type": ("epsilon", ("flow_prediction",)),
        "use_flow_sigmas": (False, (True,)),
        "solver_order": (2, (2,)),
        # diffusers runs midpoint, heun and logrho as bh2.
        "solver_type": ("bh2", ("bh2", "midpoint", "heun", "logrho")),
        "predict_x0": (True, (True,)),
        "lower_order_final": (True, (True,)),
        "final_sigmas_type": ("zero", ("zero",)),
        "disable_corrector": ([], ([],)),
        "solver_p": (None, (None,)),
        "thresholding": (False, (False,)),
        "use_karras_sigmas": (False, (False,)),
        "use_exponential_sigmas": (False, (False,)),
        "use_beta_sigmas": (False, (False,)),
        "use_dynamic_shifting": (False, (False,)),
        "shift_terminal": (None, (None,)),
    }),
    "FlowMatchEulerDiscreteScheduler": ("euler", "shift", {
        "use_dynamic_shifting": (False, (False,)),
        "invert_sigmas": (False, (False,)),
        "shift_terminal": (None, (None,)),
        "stochastic_sampling": (False, (False,)),
        "use_karras_sigmas": (False, (False,)),
        "use_exponential_sigmas": (False, (False,)),
        "use_beta_sigmas": (False, (False,)),
    }),
    "DPMSolverMultistepScheduler": ("dpm++", "flow_shift", {
        "prediction_type": ("epsilon", ("flow_prediction",)),
        "use_flow_sigmas": (False, (True,)),
        "algorithm_type": ("dpmsolver++", ("dpmsolver++",)),
        "solver_order": (2, (2,)),
        # diffusers runs logrho, bh1 and bh2 as midpoint. lower_order_final and euler_at_final
        # do not matter at order 2 with a final sigma of 0: the last step is first-order anyway.
        "solver_type": ("midpoint", ("midpoint", "logrho", "bh1", "bh2")),
        "final_sigmas_type": ("zero", ("zero",)),
        "thresholding": (False, (False,)),
        "use_karras_sigmas": (False, (False,)),
        "use_exponential_sigmas": (False, (False,)),
        "use_beta_sigmas": (False, (False,)),
        "use_lu_lambdas": (False, (False,)),
        "use_dynamic_shifting": (False, (False,)),
    }),
}


def from_scheduler_config(config: dict) -> dict:
  """A root's scheduler/scheduler_config.json -> {"sampler", "shift", "num_train_timesteps"}.

  Missing keys take diffusers' defaults. Raises ConfigError (a ValueError) for a class or setting
  that these samplers do not reproduce.
  """
  name = config.get("_class_name")
  if name not in _CONFIGS:
    raise ConfigError(f"scheduler class {name!r} is not supported; use one of "
                      f"{', '.join(_CONFIGS)} in scheduler/scheduler_config.json")
  sampler, shift_key, settings = _CONFIGS[name]
  for key, (default, allowed) in settings.items():
    value = config.get(key, default)
    if value not in allowed:
      given = "" if key in config else " (the default)"
      raise ConfigError(f"{name} with {key}={json.dumps(value)}{given} is not reproduced by "
                        f"wan.samplers; set \"{key}\": {json.dumps(allowed[0])} in "
                        "scheduler/scheduler_config.json")
  out = {"sampler": sampler, "shift": config.get(shift_key, 1.0),
         "num_train_timesteps": config.get("num_train_timesteps", 1000)}
  try:
    check(sampler, 1, out["shift"], out["num_train_timesteps"])
  except ConfigError as e:
    raise ConfigError(f"{name} in scheduler/scheduler_config.json: {e}") from None
  out["shift"] = float(out["shift"])
  return out
