"""SSIM against an independent float64 NumPy / SciPy reference of Wang et al. (2004): a 2D
Gaussian window, 'valid' correlation, population (not sample) variances."""

import jax
import numpy as np
import pytest
from scipy import signal

from wan.ssim import ssim


def _reference_image(x, y, data_range=1.0, window=11, sigma=1.5, k1=0.01, k2=0.03):
  """SSIM of two (H, W) images in float64, straight from the paper's definitions."""
  r = np.arange(window) - (window - 1) / 2
  w = np.exp(-(r[:, None]**2 + r[None, :]**2) / (2 * sigma**2))
  w /= w.sum()
  local = lambda z: signal.correlate2d(z, w, mode="valid")
  mx, my = local(x), local(y)
  vx, vy, cxy = local(x * x) - mx**2, local(y * y) - my**2, local(x * y) - mx * my
  c1, c2 = (k1 * data_range)**2, (k2 * data_range)**2
  return np.mean((2 * mx * my + c1) * (2 * cxy + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2)))


def _reference(a, b, **kw):
  """(..., F, H, W, C) -> (...,): the mean over frames and channels of the per-image SSIM."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  lead = a.shape[:-4]
  a = a.reshape(-1, *a.shape[-4:])
  b = b.reshape(-1, *b.shape[-4:])
  out = [np.mean([_reference_image(va[f, ..., c], vb[f, ..., c], **kw)
                  for f in range(va.shape[0]) for c in range(va.shape[-1])])
         for va, vb in zip(a, b)]
  return np.reshape(out, lead)


def _scene(rng, frames, height, width):
  """Smooth shapes with texture: a (F, H, W, 3) video in [0, 1] moving one pixel a frame."""
  y, x = np.mgrid[:height, :width + frames] / 8.0
  base = 0.5 + 0.25 * np.sin(x) * np.cos(0.7 * y) + 0.1 * (x + y > 6)
  base = np.clip(base + 0.03 * rng.standard_normal(base.shape), 0, 1)
  video = np.stack([base[:, f:f + width] for f in range(frames)])
  return np.stack([video, video**1.5, 1 - video], axis=-1)


rng = np.random.default_rng(0)
SCENE = _scene(rng, 3, 32, 40)
CASES = {
    "random": (rng.random((2, 24, 20, 3)), rng.random((2, 24, 20, 3))),
    "noisy copy": (SCENE, np.clip(SCENE + 0.05 * rng.standard_normal(SCENE.shape), 0, 1)),
    "shifted copy": (SCENE, np.roll(SCENE, 2, axis=2)),
    "darker copy": (SCENE, 0.8 * SCENE),
    "flat vs texture": (np.full_like(SCENE, 0.3), SCENE),
}


@pytest.mark.parametrize("name", list(CASES))
def test_matches_float64_reference(name):
  a, b = CASES[name]
  got = float(ssim(a.astype(np.float32), b.astype(np.float32)))
  assert abs(got - _reference(a, b)) <= 1e-5, (got, _reference(a, b))


def test_identical_is_one_and_batch_axes_and_data_range():
  a = np.stack([SCENE, CASES["noisy copy"][1]]) * 255  # (2, F, H, W, 3) in [0, 255]
  b = np.stack([SCENE, SCENE]) * 255
  got = jax.jit(ssim, static_argnames=("data_range",))(a, b, data_range=255.0)
  assert got.shape == (2,) and got.dtype == np.float32
  np.testing.assert_allclose(got, _reference(a, b, data_range=255.0), atol=1e-5)
  assert float(got[0]) == pytest.approx(1.0, abs=1e-6)
  # A smaller window and other constants reach the same formula.
  small = ssim(a[1], b[1], data_range=255.0, window=7, sigma=1.0, k1=0.02, k2=0.05)
  assert float(small) == pytest.approx(
      _reference(a[1], b[1], data_range=255.0, window=7, sigma=1.0, k1=0.02, k2=0.05), abs=1e-5)


def test_refuses_bad_shapes():
  with pytest.raises(ValueError, match="one shape"):
    ssim(np.zeros((1, 16, 16, 3)), np.zeros((1, 16, 17, 3)))
  with pytest.raises(ValueError, match="11-pixel window"):
    ssim(np.zeros((1, 10, 16, 3)), np.zeros((1, 10, 16, 3)))
  with pytest.raises(ValueError, match="frames, height, width, channels"):
    ssim(np.zeros((16, 16, 3)), np.zeros((16, 16, 3)))
