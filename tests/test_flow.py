"""Flow-matching math against float64 NumPy."""

import jax
import numpy as np
import pytest
from scipy import stats

from wan import flow


def test_shift_matches_formula_and_inverts():
  u = np.linspace(0, 1, 101)
  for s in (1.0, 3.0, 5.0, 12.0):
    want = s * u / (1 + (s - 1) * u)
    np.testing.assert_allclose(flow.shift(u, s), want, rtol=1e-12)
    np.testing.assert_allclose(flow.unshift(want, s), u, rtol=1e-9, atol=1e-12)


def test_noisy_and_velocity():
  rng = np.random.default_rng(0)
  x0, noise = rng.standard_normal((2, 3, 4)), rng.standard_normal((2, 3, 4))
  sigma = np.array([0.2, 0.9])
  want = (1 - sigma[:, None, None]) * x0 + sigma[:, None, None] * noise
  np.testing.assert_allclose(flow.noisy(x0, noise, sigma), want, rtol=1e-6)
  np.testing.assert_allclose(flow.velocity(x0, noise), noise - x0)


def test_uniform_sampling_is_the_shifted_uniform_distribution():
  s = 5.0
  sig = np.asarray(flow.sample_sigmas(jax.random.key(0), 20000, flow_shift=s))
  # P(sigma <= x) = P(u <= unshift(x)) = unshift(x) for uniform u.
  result = stats.kstest(sig, lambda x: x / (s - (s - 1) * x))
  assert result.pvalue > 1e-3


def test_logit_normal_sampling():
  sig = np.asarray(flow.sample_sigmas(jax.random.key(1), 20000, sampling="logit_normal",
                                      mean=0.5, std=0.8))
  logits = np.log(sig) - np.log1p(-sig)
  assert stats.kstest(logits, stats.norm(0.5, 0.8).cdf).pvalue > 1e-3


@pytest.mark.parametrize("sampling", ["uniform", "logit_normal"])
def test_range_restriction_keeps_the_distribution_shape(sampling):
  s, lo, hi = 3.0, 0.875, 1.0
  got = np.asarray(flow.sample_sigmas(jax.random.key(2), 20000, sampling=sampling,
                                      flow_shift=s, sigma_range=(lo, hi)))
  assert got.min() >= lo and got.max() <= hi
  # Reference: float64 rejection sampling from the unrestricted distribution.
  rng = np.random.default_rng(0)
  u = rng.uniform(size=400000) if sampling == "uniform" else 1 / (1 + np.exp(
      -rng.standard_normal(400000)))
  ref = s * u / (1 + (s - 1) * u)
  ref = ref[(ref >= lo) & (ref <= hi)]
  assert stats.ks_2samp(got, ref).pvalue > 1e-3


def test_bell_weight_peaks_mid_schedule_and_averages_one():
  s = 5.0
  u = np.linspace(1.0, 0.0, 1000, endpoint=False)
  sigma = s * u / (1 + (s - 1) * u)
  w = np.asarray(flow.bell_weight(sigma, s), np.float64)
  y = np.exp(-2 * (sigma - 0.5) ** 2)
  want = (y - y.min()) / (y - y.min()).mean()
  np.testing.assert_allclose(w, want, rtol=1e-5, atol=1e-6)
  assert abs(w.mean() - 1) < 1e-5
  assert float(flow.bell_weight(np.float32(0.5), s)) == pytest.approx(w.max(), rel=1e-5)
