"""Analytic FLOPs of one transformer forward pass (2 FLOPs per multiply-add, matmuls only).

Used for TFLOPS/MFU in the trainer; checked against XLA's cost analysis in the tests.
"""

import math


def flops(cfg, batch: int, frames: int, height: int, width: int, text_len: int,
          image_len: int = 0, per_token_timestep: bool = False) -> float:
  """Forward FLOPs for `batch` latent videos of (frames, height, width) latent-space size.

  Counts every matmul: patch embedding, time/text/image MLPs, q/k/v/o projections, attention
  scores and weighted sums (self: S x S, cross: S x (text_len + image_len)), FFN and the head.
  Elementwise work (norms, RoPE, softmax, modulation) is left out: it is a few percent at most.
  """
  pt, ph, pw = cfg.patch_size
  s = (frames // pt) * (height // ph) * (width // pw)
  d, f = cfg.dim, cfg.ffn_dim
  n_time = s if per_token_timestep else 1
  per_sample = 2 * s * cfg.patch_volume * cfg.in_channels * d  # patch embedding
  per_sample += n_time * 2 * (cfg.freq_dim * d + d * d + d * 6 * d)  # time MLP + projection
  per_sample += 2 * text_len * (cfg.text_dim * d + d * d)  # text MLP
  if cfg.image_dim is not None and image_len:
    per_sample += 2 * image_len * (cfg.image_dim * cfg.image_dim + cfg.image_dim * d)
  layer = 2 * s * 4 * d * d  # self-attention q, k, v, o
  layer += 4 * s * s * d  # self-attention scores + weighted sum
  layer += 2 * s * 2 * d * d + 2 * text_len * 2 * d * d  # cross-attention q, o / k, v
  layer += 4 * s * text_len * d
  if cfg.added_kv_proj_dim is not None and image_len:
    layer += 2 * image_len * 2 * cfg.added_kv_proj_dim * d + 4 * s * image_len * d
  layer += 2 * s * 2 * d * f  # FFN
  per_sample += cfg.num_layers * layer
  per_sample += 2 * s * d * cfg.out_channels * math.prod(cfg.patch_size)  # head
  return float(batch * per_sample)
