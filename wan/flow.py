"""Rectified-flow training math: noising, targets, timestep sampling and loss weighting.

sigma in [0, 1] is the noise level: x_t = (1 - sigma) * x0 + sigma * noise, the model sees
timestep 1000 * sigma and predicts the velocity noise - x0.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import ndtr, ndtri

NUM_TRAIN_TIMESTEPS = 1000
SAMPLINGS = ("uniform", "logit_normal")


@dataclasses.dataclass(frozen=True)
class Settings:
  """The flow-matching choices of a run (built by the plan)."""
  sampling: str = "uniform"  # uniform | logit_normal, before the shift
  logit_mean: float = 0.0
  logit_std: float = 1.0
  shift: float = 1.0
  sigma_range: tuple[float, float] = (0.0, 1.0)  # a Wan 2.2 A14B expert's side of the boundary
  bell_weighting: bool = True  # MaxDiffusion's mid-timestep loss weighting
  caption_dropout: float = 0.0


def shift(u, s: float):
  """Wan/SD3 timestep shift: more weight on high noise for s > 1."""
  return s * u / (1.0 + (s - 1.0) * u)


def unshift(sigma, s: float):
  """Inverse of `shift`."""
  return sigma / (s - (s - 1.0) * sigma)


def _cdf(u, sampling, mean, std):
  if sampling == "uniform":
    return u
  u = jnp.clip(u, 1e-7, 1 - 1e-7)
  return ndtr((jnp.log(u) - jnp.log1p(-u) - mean) / std)


def _icdf(v, sampling, mean, std):
  if sampling == "uniform":
    return v
  return jax.nn.sigmoid(mean + std * ndtri(v))


def sample_sigmas(key, n: int, *, sampling: str = "uniform", mean: float = 0.0,
                  std: float = 1.0, flow_shift: float = 1.0, sigma_range=(0.0, 1.0)):
  """n noise levels: u ~ uniform or logit-normal(mean, std), then shifted by `flow_shift`.

  `sigma_range` (low, high) restricts the shifted sigma (a Wan 2.2 A14B expert's side of the
  boundary) by inverse-CDF sampling, which keeps the shape of the distribution inside the range
  instead of piling rejected samples at its edge. Returns (n,) float32.
  """
  lo, hi = (unshift(jnp.float32(b), flow_shift) for b in sigma_range)
  v_lo, v_hi = _cdf(lo, sampling, mean, std), _cdf(hi, sampling, mean, std)
  v = jax.random.uniform(key, (n,), jnp.float32, v_lo, v_hi)
  u = _icdf(v, sampling, mean, std)
  return jnp.clip(shift(u, flow_shift), sigma_range[0], sigma_range[1])


def noisy(x0, noise, sigma):
  """x_t for clean x0 (B, ...) and per-sample sigma (B,)."""
  s = sigma.reshape(sigma.shape + (1,) * (x0.ndim - 1))
  return (1.0 - s) * x0 + s * noise


def velocity(x0, noise):
  """The regression target: noise - x0."""
  return noise - x0


def _bell(sigma):
  return np.exp(-2.0 * (np.asarray(sigma) - 0.5) ** 2)


def bell_weight(sigma, flow_shift: float):
  """Mid-timestep loss weighting (MaxDiffusion's default, after DiffSynth's "bsmntw").

  w(t) = exp(-2 ((t - 500) / 1000)^2) - min, normalised to mean 1 over the shifted 1000-step
  training schedule, so that the weighted loss keeps the unweighted loss's scale.
  """
  schedule = shift(np.linspace(1.0, 0.0, NUM_TRAIN_TIMESTEPS, endpoint=False), flow_shift)
  y = _bell(schedule)
  floor, mean = y.min(), (y - y.min()).mean()
  return (jnp.exp(-2.0 * (sigma - 0.5) ** 2) - floor) / mean
