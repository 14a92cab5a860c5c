"""The samplers against diffusers' schedulers run in float64 (tests/golden/samplers.npz, from
tools/golden/samplers.py), with the same fake velocity model computed here in NumPy."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.conftest import GOLDEN_DIR
from wan import samplers
from wan.errors import ConfigError

GOLDEN = dict(np.load(os.path.join(GOLDEN_DIR, "samplers.npz")))
CASES = [(str(name), int(steps), float(shift)) for name, steps, shift in
         zip(GOLDEN["case_sampler"], GOLDEN["case_steps"], GOLDEN["case_shift"])]

# scheduler/scheduler_config.json of Wan-AI/Wan2.1-T2V-1.3B-Diffusers.
RELEASED = {
    "_class_name": "UniPCMultistepScheduler", "beta_end": 0.02, "beta_schedule": "linear",
    "beta_start": 0.0001, "disable_corrector": [], "dynamic_thresholding_ratio": 0.995,
    "final_sigmas_type": "zero", "flow_shift": 3.0, "lower_order_final": True,
    "num_train_timesteps": 1000, "predict_x0": True, "prediction_type": "flow_prediction",
    "rescale_betas_zero_snr": False, "sample_max_value": 1.0, "solver_order": 2, "solver_p": None,
    "solver_type": "bh2", "steps_offset": 0, "thresholding": False, "timestep_spacing": "linspace",
    "trained_betas": None, "use_beta_sigmas": False, "use_exponential_sigmas": False,
    "use_flow_sigmas": True, "use_karras_sigmas": False,
}


def _velocity(x, t, xp=np):
  """The golden file's fake model: tanh(A @ x) * (1 + t / 1000) + b."""
  a, b = xp.asarray(GOLDEN["A"], x.dtype), xp.asarray(GOLDEN["b"], x.dtype)
  return xp.tanh(a @ x.reshape(-1)).reshape(x.shape) * (1.0 + t / 1000.0) + b


def _run(schedule, x, xp=np):
  """The whole trajectory (N + 1, *x.shape): the input, then each step's output."""
  state, out = samplers.init(schedule, x), [x]
  for i in range(len(schedule.timesteps)):
    x, state = samplers.step(schedule, state, i, _velocity(x, float(schedule.timesteps[i]), xp), x)
    out.append(x)
  return xp.stack(out)


@pytest.mark.parametrize("k", range(len(CASES)), ids=["-".join(map(str, c)) for c in CASES])
def test_matches_diffusers_in_float64(k):
  sampler, steps, shift = CASES[k]
  sch = samplers.schedule(sampler, steps, shift)
  assert sch.sigmas.shape == (steps + 1,) and sch.timesteps.shape == (steps,)
  assert sch.sigmas.dtype == sch.timesteps.dtype == np.float64 and sch.sigmas[-1] == 0.0
  np.testing.assert_allclose(sch.timesteps, GOLDEN[f"timesteps_{k}"], rtol=0, atol=1e-12)
  np.testing.assert_allclose(sch.sigmas, GOLDEN[f"sigmas_{k}"], rtol=0, atol=1e-12)

  got, want = _run(sch, GOLDEN["sample"]), GOLDEN[f"trajectory_{k}"]
  assert got.dtype == np.float64
  for i in range(1, steps + 1):
    err = np.abs(got[i] - want[i]).max() / np.abs(want[i]).max()
    assert err <= 1e-10, f"step {i - 1}: relative error {err:.2e}"


@pytest.mark.parametrize("sampler", samplers.SAMPLERS)
def test_float32_jax_under_jit_and_eagerly(sampler):
  k = CASES.index((sampler, 10, 5.0))
  sch = samplers.schedule(sampler, 10, 5.0)
  x = jnp.asarray(GOLDEN["sample"], jnp.float32)
  jitted = jax.jit(lambda x: _run(sch, x, jnp))(x)
  eager = _run(sch, x, jnp)
  want = GOLDEN[f"trajectory_{k}"][-1]
  for got in (jitted, eager):
    assert got.dtype == jnp.float32
    err = np.abs(np.asarray(got[-1], np.float64) - want).max() / np.abs(want).max()
    assert err <= 1e-5, f"relative error {err:.2e}"
  state = samplers.init(sch, x)
  _, state = samplers.step(sch, state, 0, x, x)
  assert all(v.dtype == jnp.float32 for v in state.values())


def test_from_scheduler_config_reads_the_released_roots():
  assert samplers.from_scheduler_config(RELEASED) == {
      "sampler": "unipc", "shift": 3.0, "num_train_timesteps": 1000}
  euler = {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 5.0,
           "num_train_timesteps": 1000}
  assert samplers.from_scheduler_config(euler)["sampler"] == "euler"
  dpm = {"_class_name": "DPMSolverMultistepScheduler", "prediction_type": "flow_prediction",
         "use_flow_sigmas": True, "flow_shift": 5.0, "final_sigmas_type": "zero"}
  assert samplers.from_scheduler_config(dpm) == {
      "sampler": "dpm++", "shift": 5.0, "num_train_timesteps": 1000}


@pytest.mark.parametrize("change, words", [
    ({"use_karras_sigmas": True}, ['use_karras_sigmas=true', '"use_karras_sigmas": false']),
    ({"thresholding": True}, ['thresholding=true', '"thresholding": false']),
    ({"prediction_type": "epsilon"}, ['prediction_type="epsilon"', '"flow_prediction"']),
    ({"solver_order": 3}, ["solver_order=3", '"solver_order": 2']),
    ({"disable_corrector": [0]}, ["disable_corrector=[0]"]),
    ({"final_sigmas_type": "sigma_min"}, ['"final_sigmas_type": "zero"']),
    ({"use_flow_sigmas": None}, ["use_flow_sigmas=false (the default)"]),
    ({"flow_shift": 0.0}, ["shift must be a positive number"]),
    ({"_class_name": "EulerDiscreteScheduler"}, ["'EulerDiscreteScheduler' is not supported",
                                                 "UniPCMultistepScheduler"]),
])
def test_from_scheduler_config_refuses_what_it_does_not_reproduce(change, words):
  config = {k: v for k, v in dict(RELEASED, **change).items() if v is not None}
  with pytest.raises(ValueError) as e:
    samplers.from_scheduler_config(config)
  for w in words:
    assert w in str(e.value), str(e.value)


def test_invalid_arguments_are_refused():
  for args, words in [(("heun", 10, 5.0), "use one of unipc, euler, dpm++"),
                      (("unipc", 0, 5.0), "num_steps must be an integer >= 1"),
                      (("unipc", 2.5, 5.0), "num_steps must be an integer >= 1"),
                      (("euler", 10, 0.0), "shift must be a positive number"),
                      (("euler", 10, -3.0), "shift must be a positive number"),
                      (("dpm++", 10, float("nan")), "shift must be a positive number")]:
    with pytest.raises(ConfigError, match=words):
      samplers.schedule(*args)
  sch = samplers.schedule("unipc", 3, 3.0)
  x = np.zeros((2, 3))
  with pytest.raises(ValueError, match="use 0 to 2"):
    samplers.step(sch, samplers.init(sch, x), 3, x, x)
  with pytest.raises(TypeError, match="Python int"):
    samplers.step(sch, samplers.init(sch, x), jnp.asarray(0), x, x)
