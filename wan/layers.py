"""The layers every network shares: the one dense call and the float32 norms.

Every linear layer of the transformer and of the text and image encoders goes through `dense`,
so that later adapters (LoRA, quantization) transform one call instead of copies of layers. A
dense parameter is `{"kernel": (in..., out...), "bias": (out...)}` (bias optional), plus
`lora_a` (in, r) and `lora_b` (r, out) when wan/lora.py has attached an adapter to it, and
an empty `qt` (or a qwix QArray kernel) when wan/quant.py has selected it for quantization.

The VAE keeps its own convolutions and its L2-normalising RMS norm (a different formula: see
wan/vae/blocks.py).
"""

import functools
import math

import jax
import jax.numpy as jnp

from wan import quant as quant_lib


def dense(p, x, *, dtype, precision=None, in_dims: int = 1, quant=None):
  """x (..., *in) @ kernel (*in, *out) + bias (*out), computed in `dtype`.

  `in_dims` is the number of trailing dimensions of x (leading of the kernel) contracted: 1 for
  a (D, F) matrix, 2 for a (H, Dh, D) attention output projection. quant: a wan.quant.Settings;
  a layer wan/quant.py has marked or stored quantized then runs through qwix.
  """
  kernel = p["kernel"]
  contract_x = tuple(range(x.ndim - in_dims, x.ndim))
  dimension_numbers = ((contract_x, tuple(range(in_dims))), ((), ()))
  if quant is not None and ("qt" in p or quant_lib.is_stored(kernel)):
    y = quant_lib.dot(x, kernel, dimension_numbers, quant, dtype)
  else:
    y = jax.lax.dot_general(x.astype(dtype), kernel.astype(dtype), dimension_numbers,
                            precision=precision)
  if "lora_a" in p:  # the low-rank path: no (in, out) product, so no gradient of the kernel
    if in_dims != 1:
      raise ValueError("LoRA adapters go on (in, out) kernels only")
    h = jax.lax.dot_general(x.astype(dtype), p["lora_a"].astype(dtype),
                            ((contract_x, (0,)), ((), ())), precision=precision)
    y = y + jax.lax.dot_general(h, p["lora_b"].astype(dtype),
                                (((h.ndim - 1,), (0,)), ((), ())), precision=precision)
  if "bias" in p:
    y = y + p["bias"].astype(dtype)
  return y


# The norms and the tanh GELU have hand-written backwards. Autodiff of their formulas keeps
# every intermediate for the backward (a LayerNorm kept three (S, D) arrays, the GELU five
# (S, F) ones); without remat those are stacked over the scanned layers, written in the
# forward and read back in the backward. Each keeps only what its derivative reads: the
# normalized rows and their reciprocal scale, or the GELU's input.


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _normalize(x, eps: float, center: bool):
  """(x - mean) / std (center) or x / rms over the last axis; x float32."""
  return _normalize_fwd(x, eps, center)[0]


def _normalize_fwd(x, eps, center):
  if center:
    x = x - x.mean(-1, keepdims=True)
  rstd = jax.lax.rsqrt(jnp.square(x).mean(-1, keepdims=True) + eps)
  y = x * rstd
  return y, (y, rstd)


def _normalize_bwd(eps, center, residuals, dy):
  del eps
  y, rstd = residuals
  dx = (dy - y * jnp.mean(dy * y, -1, keepdims=True)) * rstd
  if center:
    dx = dx - dx.mean(-1, keepdims=True)
  return (dx,)


_normalize.defvjp(_normalize_fwd, _normalize_bwd)


def layer_norm(x, eps: float, scale=None, bias=None):
  """LayerNorm over the last axis in float32 (as the references' FP32 norms); returns float32.

  scale, bias: (D,) or None for a norm without affine parameters.
  """
  y = _normalize(x.astype(jnp.float32), eps, True)
  if scale is not None:
    y = y * scale.astype(jnp.float32) + bias.astype(jnp.float32)
  return y


def rms_norm(x, scale, eps: float):
  """x * rsqrt(mean(x^2) + eps) * scale over the last axis, float32 inside; returns x's dtype.

  T5's LayerNorm and the Wan transformer's q/k norms (across all heads together).
  """
  y = _normalize(x.astype(jnp.float32), eps, False)
  return (y * scale.astype(jnp.float32)).astype(x.dtype)


_GELU_C = math.sqrt(2.0 / math.pi)
_GELU_A = 0.044715


def _gelu_tanh_inner(x):
  return jnp.tanh(_GELU_C * (x + _GELU_A * x * x * x))


@jax.custom_vjp
def gelu_tanh(x):
  """GELU, tanh approximation (jax.nn.gelu(approximate=True), PyTorch's approximate="tanh"):
  0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), computed in x's dtype."""
  return 0.5 * x * (1 + _gelu_tanh_inner(x))


def _gelu_tanh_fwd(x):
  return 0.5 * x * (1 + _gelu_tanh_inner(x)), x


def _gelu_tanh_bwd(x, dy):
  t = _gelu_tanh_inner(x)
  grad = 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * _GELU_C * (1 + 3 * _GELU_A * x * x)
  return (dy * grad.astype(dy.dtype),)


gelu_tanh.defvjp(_gelu_tanh_fwd, _gelu_tanh_bwd)
