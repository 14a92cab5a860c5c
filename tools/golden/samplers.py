"""Golden trajectories for the three Wan samplers from diffusers' schedulers, in float64.

Writes tests/golden/samplers.npz:

    sample            (2, 3, 4)   float64 initial noise
    A, b              (24, 24), (2, 3, 4) float64: the fake velocity model
                      v(x, t) = tanh(A @ x.ravel()).reshape(x.shape) * (1 + t / 1000) + b
    case_sampler      (C,) str    unipc | euler | dpm++; case_steps (C,) int; case_shift (C,) float
    timesteps_<k>     (N,)        float64 diffusers' scheduler.timesteps (what the model is given)
    sigmas_<k>        (N + 1,)    float64 diffusers' scheduler.sigmas
    trajectory_<k>    (N + 1, 2, 3, 4) float64: the initial sample, then the sample after each step

The schedulers are built as Wan's roots and pipelines build them: UniPC from the released
Wan2.1-T2V-1.3B-Diffusers scheduler_config.json with flow_shift replaced, Euler as
`FlowMatchEulerDiscreteScheduler(shift=...)`, DPM-Solver++ 2M as the diffusers equivalent of
Wan-AI's FlowDPMSolverMultistepScheduler. Two things keep the reference float64 end to end:
the scheduler's sigmas (float32 values, as diffusers stores them) are moved to float64 after
`set_timesteps` so the per-step coefficients are computed in float64, and the float32 "upcast"
that the Euler and DPM steps apply to the sample is skipped for float64 samples.
"""

import contextlib
import os

import diffusers
import numpy as np
import torch
from diffusers import (DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler,
                       UniPCMultistepScheduler)

# scheduler/scheduler_config.json of Wan-AI/Wan2.1-T2V-1.3B-Diffusers.
RELEASED_UNIPC = {
    "beta_end": 0.02, "beta_schedule": "linear", "beta_start": 0.0001, "disable_corrector": [],
    "dynamic_thresholding_ratio": 0.995, "final_sigmas_type": "zero", "flow_shift": 3.0,
    "lower_order_final": True, "num_train_timesteps": 1000, "predict_x0": True,
    "prediction_type": "flow_prediction", "rescale_betas_zero_snr": False,
    "sample_max_value": 1.0, "solver_order": 2, "solver_p": None, "solver_type": "bh2",
    "steps_offset": 0, "thresholding": False, "timestep_spacing": "linspace",
    "trained_betas": None, "use_beta_sigmas": False, "use_exponential_sigmas": False,
    "use_flow_sigmas": True, "use_karras_sigmas": False,
}

# (sampler, steps, shift). 1 and 2 steps hit the order ramp-up and the first-order final step
# at once; 3 is the first with a second-order step; 3.17 is not a float32 number, which matters
# where diffusers computes part of the schedule in float32 (Euler's sigma_min).
CASES = (
    ("unipc", 1, 3.0), ("unipc", 2, 3.0), ("unipc", 3, 3.0), ("unipc", 10, 3.0),
    ("unipc", 1, 5.0), ("unipc", 2, 5.0), ("unipc", 3, 5.0), ("unipc", 10, 5.0),
    ("unipc", 25, 12.0), ("unipc", 6, 3.17),
    ("euler", 1, 5.0), ("euler", 4, 5.0), ("euler", 10, 5.0), ("euler", 4, 3.17),
    ("dpm++", 1, 5.0), ("dpm++", 2, 5.0), ("dpm++", 3, 5.0), ("dpm++", 5, 5.0),
    ("dpm++", 10, 5.0), ("dpm++", 7, 3.17),
)
SHAPE = (2, 3, 4)
SEED = 0


def _scheduler(sampler, shift):
  if sampler == "unipc":
    return UniPCMultistepScheduler(**dict(RELEASED_UNIPC, flow_shift=shift))
  if sampler == "euler":
    return FlowMatchEulerDiscreteScheduler(shift=shift)
  return DPMSolverMultistepScheduler(
      prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift,
      algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint",
      lower_order_final=True, final_sigmas_type="zero", num_train_timesteps=1000)


@contextlib.contextmanager
def _no_float32_cast_of_float64():
  """Makes `t.to(torch.float32)` a no-op for float64 tensors while active.

  diffusers' Euler and DPM steps cast the sample to float32 to protect half-precision runs;
  on a float64 sample that would round the reference to float32.
  """
  original = torch.Tensor.to

  def to(self, *args, **kwargs):
    if self.dtype == torch.float64 and args == (torch.float32,) and not kwargs:
      return self
    return original(self, *args, **kwargs)

  torch.Tensor.to = to
  try:
    yield
  finally:
    torch.Tensor.to = original


def _velocity(x, t, a, b):
  return torch.tanh(a @ x.reshape(-1)).reshape(x.shape) * (1.0 + t / 1000.0) + b


def _trajectory(sampler, steps, shift, sample, a, b):
  sched = _scheduler(sampler, shift)
  sched.set_timesteps(steps)
  sched.set_begin_index(0)  # as WanPipeline does
  sigmas = sched.sigmas.numpy().astype(np.float64)
  timesteps = sched.timesteps.numpy().astype(np.float64)
  sched.sigmas = sched.sigmas.to(torch.float64)
  x = sample.clone()
  out = [x.numpy().copy()]
  with _no_float32_cast_of_float64():
    for t in sched.timesteps:
      v = _velocity(x, float(t), a, b)
      x = sched.step(v, t, x, return_dict=False)[0]
      assert x.dtype == torch.float64, x.dtype
      out.append(x.numpy().copy())
  return timesteps, sigmas, np.stack(out)


def make(out_dir):
  rng = np.random.default_rng(SEED)
  size = int(np.prod(SHAPE))
  sample = rng.standard_normal(SHAPE)
  a = rng.standard_normal((size, size)) * (1.5 / np.sqrt(size))
  b = 0.3 * rng.standard_normal(SHAPE)
  record = {"sample": sample, "A": a, "b": b,
            "case_sampler": np.array([c[0] for c in CASES]),
            "case_steps": np.array([c[1] for c in CASES]),
            "case_shift": np.array([c[2] for c in CASES]),
            "diffusers_version": np.array(diffusers.__version__)}
  ta, tb = torch.from_numpy(a), torch.from_numpy(b)
  for k, (sampler, steps, shift) in enumerate(CASES):
    timesteps, sigmas, traj = _trajectory(sampler, steps, shift, torch.from_numpy(sample), ta, tb)
    record.update({f"timesteps_{k}": timesteps, f"sigmas_{k}": sigmas, f"trajectory_{k}": traj})
    print(f"samplers {sampler} steps={steps} shift={shift}: t {timesteps[:3]}..., "
          f"|x_final| mean {np.abs(traj[-1]).mean():.4f}")
  path = os.path.join(out_dir, "samplers.npz")
  np.savez_compressed(path, **record)
  print(f"wrote {path} ({os.path.getsize(path)} bytes)")
