"""Layers of the Wan VAE as functions over channels-last arrays, with their declarations.

Every temporal convolution is causal and streams: it takes the last frames of its input from the
previous chunk (`cache`) and returns the last frames of this one, so a video is processed chunk by
chunk with memory bounded by the chunk size. `cache=None` marks the first chunk of a video: the
history is then zeros, and the temporal resamplers let the first frame pass through unchanged
(Wan encodes and decodes the first frame on its own, like an image).

Shapes: x (B, T, H, W, C). Convolution kernels are (kt, kh, kw, in, out) / (kh, kw, in, out).
"""

import math

import jax
import jax.numpy as jnp

from wan import attention
from wan.params import Param, fan_in_uniform, ones, zeros

RMS_EPS = 1e-12  # the floor of the L2 norm in torch's F.normalize, which Wan's RMS norm uses


# ---------------------------------------------------------------- declarations

def conv_decl(cin: int, cout: int, kernel: tuple[int, ...]) -> dict:
  """A 3D (kt, kh, kw) or 2D (kh, kw) convolution; VAE parameters are replicated (axes None)."""
  shape = tuple(kernel) + (cin, cout)
  return {"kernel": Param(shape, (None,) * len(shape), fan_in_uniform(len(kernel) + 1)),
          "bias": Param((cout,), (None,), zeros)}


def dense_decl(cin: int, cout: int) -> dict:
  return {"kernel": Param((cin, cout), (None, None), fan_in_uniform(1)),
          "bias": Param((cout,), (None,), zeros)}


def norm_decl(dim: int) -> dict:
  return {"scale": Param((dim,), (None,), ones)}


def resnet_decl(cin: int, cout: int) -> dict:
  decl = {"norm1": norm_decl(cin), "conv1": conv_decl(cin, cout, (3, 3, 3)),
          "norm2": norm_decl(cout), "conv2": conv_decl(cout, cout, (3, 3, 3))}
  if cin != cout:
    decl["conv_shortcut"] = conv_decl(cin, cout, (1, 1, 1))
  return decl


def attention_decl(dim: int) -> dict:
  return {"norm": norm_decl(dim), "to_qkv": dense_decl(dim, 3 * dim), "proj": dense_decl(dim, dim)}


def mid_block_decl(dim: int) -> dict:
  return {"resnets": [resnet_decl(dim, dim), resnet_decl(dim, dim)],
          "attentions": [attention_decl(dim)]}


def downsample_decl(dim: int, temporal: bool) -> dict:
  decl = {"conv": conv_decl(dim, dim, (3, 3))}
  if temporal:
    decl["time_conv"] = conv_decl(dim, dim, (3, 1, 1))
  return decl


def upsample_decl(dim: int, out_dim: int, temporal: bool) -> dict:
  decl = {"conv": conv_decl(dim, out_dim, (3, 3))}
  if temporal:
    # Produces two frames per input frame, stacked on channels.
    decl["time_conv"] = conv_decl(dim, 2 * dim, (3, 1, 1))
  return decl


# ---------------------------------------------------------------- layers

def cache_at(cache, *keys):
  """The cache entry at `keys`, or None on the first chunk."""
  for k in keys:
    if cache is None:
      return None
    cache = cache[k]
  return cache


def conv3d(p, x, precision, stride=(1, 1, 1)):
  """Convolution valid in time, 'same' zero padding in space. x: (B, T, H, W, Cin).

  Accumulates in float32 whatever the compute dtype."""
  kh, kw = p["kernel"].shape[1:3]
  y = jax.lax.conv_general_dilated(
      x, p["kernel"].astype(x.dtype), window_strides=stride,
      padding=[(0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2)],
      dimension_numbers=("NDHWC", "DHWIO", "NDHWC"), precision=precision,
      preferred_element_type=jnp.float32)
  return (y + p["bias"].astype(jnp.float32)).astype(x.dtype)


def conv2d(p, x, precision, stride=(1, 1), padding="SAME"):
  """Per-frame 2D convolution. x: (B, T, H, W, Cin)."""
  b, t = x.shape[:2]
  y = jax.lax.conv_general_dilated(
      x.reshape((b * t,) + x.shape[2:]), p["kernel"].astype(x.dtype), window_strides=stride,
      padding=padding, dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=precision,
      preferred_element_type=jnp.float32)
  y = (y + p["bias"].astype(jnp.float32)).astype(x.dtype)
  return y.reshape((b, t) + y.shape[1:])


def causal_conv(p, x, cache, precision):
  """Causal-in-time convolution over a chunk: returns (y, cache for the next chunk).

  cache: (B, kt - 1, H, W, Cin), the last input frames of the previous chunk (zeros before the
  first). A kt = 1 convolution needs no history and returns cache None.
  """
  history = p["kernel"].shape[0] - 1
  if history == 0:
    return conv3d(p, x, precision), None
  if cache is None:
    cache = jnp.zeros((x.shape[0], history) + x.shape[2:], x.dtype)
  x = jnp.concatenate([cache, x], axis=1)
  return conv3d(p, x, precision), x[:, -history:]


def rms_norm(p, x):
  """Wan's RMS norm: x / ||x||_2 over channels * sqrt(C) * scale, computed in float32.

  Not wan/layers.rms_norm: the epsilon floors the L2 norm (F.normalize) instead of being added
  to the mean square, which differs for small activations.
  """
  x32 = x.astype(jnp.float32)
  norm = jnp.sqrt(jnp.sum(jnp.square(x32), axis=-1, keepdims=True))
  y = x32 / jnp.maximum(norm, RMS_EPS) * math.sqrt(x.shape[-1]) * p["scale"].astype(jnp.float32)
  return y.astype(x.dtype)


def resnet(p, x, cache, precision):
  """Residual block: norm, SiLU, causal 3x3x3 conv, twice, plus a (1x1x1-projected) shortcut.

  Dropout is omitted: the VAE runs frozen (inference) in this trainer.
  """
  shortcut = conv3d(p["conv_shortcut"], x, precision) if "conv_shortcut" in p else x
  y = jax.nn.silu(rms_norm(p["norm1"], x))
  y, cache1 = causal_conv(p["conv1"], y, cache_at(cache, "conv1"), precision)
  y = jax.nn.silu(rms_norm(p["norm2"], y))
  y, cache2 = causal_conv(p["conv2"], y, cache_at(cache, "conv2"), precision)
  return y + shortcut, {"conv1": cache1, "conv2": cache2}


def attention_block(p, x, precision):
  """Single-head self-attention over the pixels of each frame, with a residual connection."""
  b, t, h, w, c = x.shape
  y = rms_norm(p["norm"], x).reshape(b * t, h * w, c)
  qkv = jnp.einsum("bsc,cd->bsd", y, p["to_qkv"]["kernel"].astype(y.dtype), precision=precision,
                   preferred_element_type=jnp.float32) + p["to_qkv"]["bias"]
  qkv = qkv.astype(x.dtype)
  q, k, v = (a[:, :, None, :] for a in jnp.split(qkv, 3, axis=-1))
  y = attention.attention(q, k, v, precision=precision)[:, :, 0, :]
  y = jnp.einsum("bsc,cd->bsd", y, p["proj"]["kernel"].astype(y.dtype), precision=precision,
                 preferred_element_type=jnp.float32) + p["proj"]["bias"]
  return x + y.reshape(b, t, h, w, c).astype(x.dtype)


def mid_block(p, x, cache, precision):
  x, cache0 = resnet(p["resnets"][0], x, cache_at(cache, "resnets", 0), precision)
  x = attention_block(p["attentions"][0], x, precision)
  x, cache1 = resnet(p["resnets"][1], x, cache_at(cache, "resnets", 1), precision)
  return x, {"resnets": [cache0, cache1]}


def downsample(p, x, cache, precision):
  """2x spatial downsampling (pad right/bottom, stride-2 3x3 conv), then 2x in time if
  `time_conv` exists: a stride-2 conv over [last frame of previous chunk, chunk]; the first chunk
  (one frame) passes through. cache: (B, 1, H/2, W/2, C)."""
  y = conv2d(p["conv"], jnp.pad(x, [(0, 0), (0, 0), (0, 1), (0, 1), (0, 0)]), precision,
             stride=(2, 2), padding="VALID")
  if "time_conv" not in p:
    return y, None
  last = y[:, -1:]
  if cache is not None:
    # [previous last, 4 frames] -> 2 frames; [previous last, 2 frames] -> 1 frame.
    y = conv3d(p["time_conv"], jnp.concatenate([cache, y], axis=1), precision, stride=(2, 1, 1))
  return y, last


def upsample(p, x, cache, precision):
  """2x in time if `time_conv` exists (each frame becomes two, from a causal conv whose history
  starts after the first frame, which passes through), then nearest 2x spatial upsampling and a
  3x3 conv. cache: (B, 2, H, W, C)."""
  new_cache = None
  if "time_conv" in p:
    if cache is None:
      new_cache = jnp.zeros((x.shape[0], 2) + x.shape[2:], x.dtype)
    else:
      b, t, h, w, c = x.shape
      y, new_cache = causal_conv(p["time_conv"], x, cache, precision)
      # Channels [0:c] are the earlier frame of each pair, [c:2c] the later.
      x = y.reshape(b, t, h, w, 2, c).transpose(0, 1, 4, 2, 3, 5).reshape(b, 2 * t, h, w, c)
  x = jnp.repeat(jnp.repeat(x, 2, axis=2), 2, axis=3)
  return conv2d(p["conv"], x, precision), new_cache


def avg_down(x, out_channels: int, factor_t: int, factor_s: int):
  """Parameter-free shortcut of a Wan 2.2 down block: space/time-to-channel, then the mean over
  groups of consecutive channels. A chunk whose length is not a multiple of factor_t (the
  first frame) is zero-padded at the front."""
  pad_t = -x.shape[1] % factor_t
  x = jnp.pad(x, [(0, 0), (pad_t, 0), (0, 0), (0, 0), (0, 0)])
  b, t, h, w, c = x.shape
  x = x.reshape(b, t // factor_t, factor_t, h // factor_s, factor_s, w // factor_s, factor_s, c)
  # Folded channel order (c, dt, dh, dw), matching the reference.
  x = x.transpose(0, 1, 3, 5, 7, 2, 4, 6)
  group = c * factor_t * factor_s * factor_s // out_channels
  return x.reshape(b, t // factor_t, h // factor_s, w // factor_s, out_channels, group).mean(-1)


def dup_up(x, out_channels: int, factor_t: int, factor_s: int, first_chunk: bool):
  """Parameter-free shortcut of a Wan 2.2 up block: repeat channels, then channel-to-space/time.
  On the first chunk only the last of the factor_t frames is kept (one frame in, one out)."""
  b, t, h, w, c = x.shape
  repeats = out_channels * factor_t * factor_s * factor_s // c
  x = jnp.repeat(x, repeats, axis=-1)
  x = x.reshape(b, t, h, w, out_channels, factor_t, factor_s, factor_s)
  x = x.transpose(0, 1, 5, 2, 6, 3, 7, 4)
  x = x.reshape(b, t * factor_t, h * factor_s, w * factor_s, out_channels)
  return x[:, factor_t - 1:] if first_chunk else x


def patchify(x, p: int):
  """(B, F, H, W, C) -> (B, F, H/p, W/p, C*p*p), folded channel order (c, dw, dh) as in Wan 2.2."""
  if p == 1:
    return x
  b, f, h, w, c = x.shape
  x = x.reshape(b, f, h // p, p, w // p, p, c).transpose(0, 1, 2, 4, 6, 5, 3)
  return x.reshape(b, f, h // p, w // p, c * p * p)


def unpatchify(x, p: int):
  """Inverse of `patchify`: (B, F, H, W, C*p*p) -> (B, F, H*p, W*p, C)."""
  if p == 1:
    return x
  b, f, h, w, cpp = x.shape
  x = x.reshape(b, f, h, w, cpp // (p * p), p, p).transpose(0, 1, 2, 6, 3, 5, 4)
  return x.reshape(b, f, h * p, w * p, cpp // (p * p))
