"""The shared layers (wan/layers.py): the norms and the tanh GELU, whose backwards are written by
hand, against float64 NumPy (the formulas, and central finite differences of them for the
gradients), and the residuals each keeps for the backward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.ad_checkpoint import print_saved_residuals

from wan import layers


def _np_layer_norm(x, eps, scale=None, bias=None):
  y = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + eps)
  return y if scale is None else y * scale + bias


def _np_rms_norm(x, scale, eps):
  return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * scale


def _np_gelu_tanh(x):
  return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def _finite_difference_vjp(f, x, dy, h=1e-6):
  """dy^T J of f at x in float64, J by central differences (one column per input element)."""
  grad = np.zeros_like(x)
  for i in np.ndindex(x.shape):
    step = np.zeros_like(x)
    step[i] = h
    grad[i] = np.sum(dy * (f(x + step) - f(x - step))) / (2 * h)
  return grad


# (name, ours, the float64 reference); the scale and bias are fixed non-trivial vectors.
_D = 12
_SCALE = np.linspace(0.5, 1.5, _D)
_BIAS = np.linspace(-0.3, 0.3, _D)
CASES = [
    ("layer_norm", lambda x: layers.layer_norm(x, 1e-6), lambda x: _np_layer_norm(x, 1e-6)),
    ("layer_norm_affine",
     lambda x: layers.layer_norm(x, 1e-6, jnp.asarray(_SCALE, jnp.float32),
                                 jnp.asarray(_BIAS, jnp.float32)),
     lambda x: _np_layer_norm(x, 1e-6, _SCALE, _BIAS)),
    ("rms_norm", lambda x: layers.rms_norm(x, jnp.asarray(_SCALE, jnp.float32), 1e-6),
     lambda x: _np_rms_norm(x, _SCALE, 1e-6)),
    ("gelu_tanh", layers.gelu_tanh, _np_gelu_tanh),
]


@pytest.mark.parametrize("name,ours,reference", CASES, ids=[c[0] for c in CASES])
def test_value_and_gradient_match_float64(name, ours, reference):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(3, _D)) * 2 + 0.5  # off-centre rows, so centring matters
  dy = rng.normal(size=(3, _D))
  y, vjp = jax.vjp(ours, jnp.asarray(x, jnp.float32))
  (dx,) = vjp(jnp.asarray(dy, jnp.float32))
  np.testing.assert_allclose(np.asarray(y), reference(x), rtol=2e-6, atol=2e-6, err_msg=name)
  np.testing.assert_allclose(np.asarray(dx), _finite_difference_vjp(reference, x, dy),
                             rtol=1e-4, atol=1e-5, err_msg=name)


def test_gelu_tanh_is_jax_gelu():
  x = jnp.linspace(-6.0, 6.0, 97)
  np.testing.assert_allclose(layers.gelu_tanh(x), jax.nn.gelu(x, approximate=True), atol=1e-6)
  np.testing.assert_allclose(jax.grad(lambda x: layers.gelu_tanh(x).sum())(x),
                             jax.grad(lambda x: jax.nn.gelu(x, approximate=True).sum())(x),
                             atol=1e-6)


def test_bfloat16_gradients_keep_the_input_dtype():
  x = jnp.linspace(-3.0, 3.0, 24, dtype=jnp.bfloat16).reshape(2, 12)
  for f in (layers.gelu_tanh, lambda x: layers.rms_norm(x, jnp.ones(12), 1e-6)):
    g = jax.grad(lambda x: f(x).astype(jnp.float32).sum())(x)
    assert g.dtype == jnp.bfloat16 and bool(jnp.isfinite(g).all())


def _residual_shapes(f, x, capsys):
  """The shapes of what autodiff keeps for f's backward (jax's printout, one line each)."""
  capsys.readouterr()
  print_saved_residuals(f, x)
  lines = capsys.readouterr().out.strip().splitlines()
  shapes = (line.split("[", 1)[1].split("]", 1)[0] for line in lines)
  return sorted(shape for shape in shapes if shape)  # scalars (literals) aside


def test_backwards_keep_only_what_their_derivative_reads(capsys):
  """The point of the hand-written backwards: autodiff of the formulas kept three (S, D) arrays
  for a LayerNorm and five for the GELU; these keep the normalised rows and their reciprocal
  scale, and the GELU's input."""
  x = jnp.ones((8, 16))
  assert _residual_shapes(lambda x: layers.layer_norm(x, 1e-6), x, capsys) == ["8,1", "8,16"]
  assert _residual_shapes(lambda x: layers.rms_norm(x, jnp.ones(16), 1e-6), x, capsys) == [
      "1,16", "8,1", "8,16"]
  assert _residual_shapes(layers.gelu_tanh, x, capsys) == ["8,16"]
