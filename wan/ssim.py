"""Structural similarity (SSIM) of videos, as Wang, Bovik, Sheikh and Simoncelli (2004) define it.

Per frame and channel: local means, variances and covariance under an 11-tap Gaussian window
(sigma 1.5, normalised to sum 1), at the 'valid' positions only (no padding), as the authors'
MATLAB code and skimage's `structural_similarity(gaussian_weights=True,
use_sample_covariance=False)` compute them; the SSIM map is averaged over positions, channels
and frames.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np


def _gaussian(window: int, sigma: float) -> np.ndarray:
  """(window,) Gaussian taps centred on the middle one, summing to 1."""
  x = np.arange(window) - (window - 1) / 2
  g = np.exp(-x**2 / (2 * sigma**2))
  return (g / g.sum()).astype(np.float32)


def _filter_valid(x: jax.Array, taps: np.ndarray) -> jax.Array:
  """Separable Gaussian filter of (..., H, W, C) over H and W, 'valid' positions only:
  (..., H - window + 1, W - window + 1, C)."""
  window = len(taps)
  for axis in (-3, -2):
    size = x.shape[axis] - window + 1
    # A weighted sum of `window` shifted slices: a 1D correlation, fused by XLA into one pass.
    x = sum(float(t) * jax.lax.slice_in_dim(x, k, k + size, axis=axis) for k, t in enumerate(taps))
  return x


def ssim(a, b, *, data_range: float = 1.0, window: int = 11, sigma: float = 1.5,
         k1: float = 0.01, k2: float = 0.03) -> jax.Array:
  """SSIM of two videos, averaged over frames, channels and window positions.

  a, b: (..., F, H, W, C) floats in [0, data_range] (jax or NumPy; an image is F = 1). Returns
  (...,) float32: 1.0 for identical videos, lower the less alike. Jit-able (the options as
  static arguments). Raises ValueError when the shapes differ or a frame is smaller than the window.
  """
  if np.shape(a) != np.shape(b):
    raise ValueError(f"SSIM compares videos of one shape, got {np.shape(a)} and {np.shape(b)}")
  if len(np.shape(a)) < 4 or min(np.shape(a)[-3:-1]) < window:
    raise ValueError(f"SSIM needs (..., frames, height, width, channels) with height and width at "
                     f"least the {window}-pixel window, got shape {np.shape(a)}")
  return _ssim(a, b, data_range=data_range, window=window, sigma=sigma, k1=k1, k2=k2)


# One compiled program per shape: eagerly, the ~100 slices of the filters dispatch one by one.
@functools.partial(jax.jit, static_argnames=("data_range", "window", "sigma", "k1", "k2"))
def _ssim(a, b, *, data_range, window, sigma, k1, k2):
  a = jnp.asarray(a, jnp.float32) / data_range  # in [0, 1]: C1 = k1^2, C2 = k2^2
  b = jnp.asarray(b, jnp.float32) / data_range
  # Centred on each frame's mean: variance as E[x^2] - E[x]^2 cancels digits in float32 when the
  # mean is far from 0 (a flat frame of 0.3: 1e-5 off the float64 SSIM uncentred, 1e-8 centred);
  # (co)variances are shift-free and the luminance term gets the means back.
  offset_a = a.mean(axis=(-3, -2), keepdims=True)
  offset_b = b.mean(axis=(-3, -2), keepdims=True)
  a, b = a - offset_a, b - offset_b
  taps = _gaussian(window, sigma)
  mu_a, mu_b = _filter_valid(a, taps), _filter_valid(b, taps)
  var_a = _filter_valid(a * a, taps) - mu_a * mu_a
  var_b = _filter_valid(b * b, taps) - mu_b * mu_b
  cov = _filter_valid(a * b, taps) - mu_a * mu_b
  mu_a, mu_b = mu_a + offset_a, mu_b + offset_b
  c1, c2 = k1**2, k2**2
  ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)
              / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)))
  return ssim_map.mean(axis=(-4, -3, -2, -1))
