"""Spatial tiling of the Wan VAE for large frames, with the same tiles and blending as diffusers.

The frame is cut into overlapping tiles (a tile every `stride` pixels, `tile` pixels wide); each
tile goes through the streamed encoder or decoder on its own; then, in raster order, every tile is
linearly cross-faded into the already blended tile above it and to its left over `blend` output
pixels, and the top-left `out_stride` pixels of each tile are stitched together.
"""

import jax
import jax.numpy as jnp


def _blend(prev, tile, extent: int, axis: int):
  """Cross-fades the first `extent` rows (along `axis`) of `tile` from the last of `prev`."""
  extent = min(prev.shape[axis], tile.shape[axis], extent)
  if extent <= 0:
    return tile
  shape = [1] * tile.ndim
  shape[axis] = extent
  w = (jnp.arange(extent, dtype=jnp.float32) / extent).astype(tile.dtype).reshape(shape)
  size = prev.shape[axis]
  head = (jax.lax.slice_in_dim(prev, size - extent, size, axis=axis) * (1 - w)
          + jax.lax.slice_in_dim(tile, 0, extent, axis=axis) * w)
  return jnp.concatenate([head, jax.lax.slice_in_dim(tile, extent, tile.shape[axis], axis=axis)],
                         axis=axis)


def tiled(fn, x, tile: tuple, stride: tuple, out_stride: tuple, blend: tuple, out_size: tuple):
  """Applies `fn` tile by tile over the H, W axes of x (B, F, H, W, C) and blends the results.

  tile, stride: (h, w) in x's pixels; out_stride, blend, out_size: (h, w) in fn's output pixels.
  Returns (B, F', out_size[0], out_size[1], C').
  """
  height, width = x.shape[2:4]
  rows = [[fn(x[:, :, i:i + tile[0], j:j + tile[1]]) for j in range(0, width, stride[1])]
          for i in range(0, height, stride[0])]
  stitched = []
  for i, row in enumerate(rows):
    for j in range(len(row)):
      # Blends read the already blended neighbours, as diffusers' in-place blending does.
      if i > 0:
        row[j] = _blend(rows[i - 1][j], row[j], blend[0], axis=2)
      if j > 0:
        row[j] = _blend(row[j - 1], row[j], blend[1], axis=3)
    stitched.append(jnp.concatenate([t[:, :, :out_stride[0], :out_stride[1]] for t in row],
                                    axis=3))
  return jnp.concatenate(stitched, axis=2)[:, :, :out_size[0], :out_size[1]]
