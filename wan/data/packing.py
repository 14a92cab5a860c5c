"""Sequence packing: clips of different latent sizes (aspect-ratio buckets) in fixed-length rows.

`pack` places whole clips, first fit in their order, into rows of `seq_len` tokens, `text_len`
caption tokens and `image_len` CLIP tokens; `transformer.forward_packed` keeps them apart with
the segment ids, so no compute goes to padding whole clips out to the largest size. The layout
of a packed batch of R rows, K segments at most per row (NumPy, host side):

  tokens             (R, S, pv * C) float32   patchified clean latents, clip after clip, 0 after
  positions          (R, S, 3) int32          (frame, row, column) in the clip's own token grid
  segment_ids        (R, S) int32             1..n for the n clips of a row, 0 on padding
  text               (R, L, D_text) float32   captions at their own lengths, one after another
  text_segment_ids   (R, L) int32             the clip of each caption token, 0 on padding
  cond_tokens        (R, S, pv * C) float32   concat conditioning (I2V), patchified like tokens
  cond_mask_tokens   (R, S, pv * 4) float32
  image              (R, N, D_image) float32  Wan 2.1 I2V CLIP states, 257 per clip
  image_segment_ids  (R, N) int32
  segment_grid       (R, K, 3) int32          (f, h, w) token grid of each segment, 0 past the last
  placement          (num_samples, 2) int32   (row, segment id) of each sample, in input order

pv = prod(patch_size). The per-token losses go back to one number per clip with
`segment_mean`, so every clip counts once however many tokens it has; `segment_broadcast`
spreads per-clip values (sigma) over the tokens; `concat_channels` builds the concat-kind
model input [x_t, cond_mask, cond] in token space; `unpack` returns per-clip videos.
"""

import math

import jax.numpy as jnp
import numpy as np

# One implementation of the token order: the transformer's.
from wan.transformer import grid_positions as positions  # noqa: F401  (part of this API)
from wan.transformer import patchify, unpatchify  # noqa: F401  (part of this API)


def _grid(latents_shape, patch_size, index):
  f, h, w = latents_shape[:3]
  if len(latents_shape) != 4 or f % patch_size[0] or h % patch_size[1] or w % patch_size[2]:
    raise ValueError(f"sample {index}: latents must be (F, H, W, C) with F, H, W multiples of "
                     f"the patch size {tuple(patch_size)}; got {tuple(latents_shape)}")
  return f // patch_size[0], h // patch_size[1], w // patch_size[2]


def _sizes(samples, patch_size, seq_len, text_len, image_len):
  """(grid, tokens, text tokens, image tokens) per sample; refuses one no empty row can hold."""
  has_image = {"image" in s for s in samples}
  has_cond = {("cond" in s, "cond_mask" in s) for s in samples}
  if len(has_image) > 1 or len(has_cond) > 1 or has_cond & {(True, False), (False, True)}:
    raise ValueError("samples must agree on their keys: all or none have 'image', and 'cond' "
                     "comes with 'cond_mask' in all or none")
  sizes = []
  for i, s in enumerate(samples):
    grid = _grid(s["latents"].shape, patch_size, i)
    for key, axis in (("latents", -1), ("text", -1), ("image", -1)):
      if key in s and s[key].shape[axis] != samples[0][key].shape[axis]:
        raise ValueError(f"sample {i}: {key} has {s[key].shape[axis]} channels, sample 0 has "
                         f"{samples[0][key].shape[axis]}; one batch has one width per key")
    n_tok, n_text = math.prod(grid), s["text"].shape[0]
    n_img = s["image"].shape[0] if "image" in s else 0
    if n_text == 0:
      # A clip with no caption token would have no key in its cross-attention (the softmax
      # would then spread over every caption of the row): give a dropped caption as zeros.
      raise ValueError(f"sample {i}: the caption has no tokens; a dropped caption is a zero "
                       "caption of at least one token")
    for what, need, have, flag in (("tokens", n_tok, seq_len, "seq_len"),
                                   ("caption tokens", n_text, text_len, "text_len"),
                                   ("image tokens", n_img, image_len, "image_len")):
      if need > have:
        raise ValueError(f"sample {i} (latents {tuple(s['latents'].shape)}, patch "
                         f"{tuple(patch_size)}) has {need} {what} but a row holds {flag}="
                         f"{have}; it needs {flag} >= {need}")
    sizes.append((grid, n_tok, n_text, n_img))
  return sizes


def _first_fit(sizes, seq_len, text_len, image_len, max_segments):
  """Row of each sample: the first row with room for its tokens, caption and image."""
  used, rows = [], []  # used[r] = [tokens, text, image, segments]
  for _, n_tok, n_text, n_img in sizes:
    for r, u in enumerate(used):
      if (u[0] + n_tok <= seq_len and u[1] + n_text <= text_len and u[2] + n_img <= image_len
          and u[3] < max_segments):
        break
    else:
      r = len(used)
      used.append([0, 0, 0, 0])
    used[r] = [used[r][0] + n_tok, used[r][1] + n_text, used[r][2] + n_img, used[r][3] + 1]
    rows.append(r)
  return rows, len(used)


def pack(samples: list[dict], seq_len: int, text_len: int, patch_size, image_len: int = 0, *,
         num_rows: int | None = None, max_segments: int | None = None) -> dict:
  """Packs clips into rows of `seq_len` tokens by first fit, keeping the order of `samples`.

  samples: dicts of NumPy arrays {"latents": (F, H, W, C), "text": (L_i, D) at the caption's
    own length, optional "cond": (F, H, W, C) with "cond_mask": (F, H, W, 4), optional
    "image": (257, D_image)}; clips may all differ in (F, H, W) and L_i.
  seq_len, text_len, image_len: tokens, caption tokens and image tokens per row.
  num_rows, max_segments: fix the number of rows (empty rows are all padding) and of segments
    per row, so that every batch has the same shapes (one compilation); None: as many as used.
  Returns the arrays of the module docstring. Raises ValueError for a sample that does not fit
  an empty row (naming the seq_len, text_len or image_len it needs) or more rows than num_rows.
  """
  if not samples:
    raise ValueError("pack needs at least one sample")
  sizes = _sizes(samples, patch_size, seq_len, text_len, image_len)
  rows, n_rows = _first_fit(sizes, seq_len, text_len, image_len, max_segments or len(samples))
  if num_rows is not None and n_rows > num_rows:
    raise ValueError(f"{len(samples)} samples need {n_rows} rows of seq_len={seq_len}, "
                     f"text_len={text_len}, image_len={image_len}; num_rows={num_rows}")
  n_rows = num_rows or n_rows
  n_seg = max_segments or max(np.bincount(rows))
  first, pv = samples[0], math.prod(patch_size)
  c, d_text = first["latents"].shape[-1], first["text"].shape[-1]
  out = {"tokens": np.zeros((n_rows, seq_len, pv * c), np.float32),
         "positions": np.zeros((n_rows, seq_len, 3), np.int32),
         "segment_ids": np.zeros((n_rows, seq_len), np.int32),
         "text": np.zeros((n_rows, text_len, d_text), np.float32),
         "text_segment_ids": np.zeros((n_rows, text_len), np.int32),
         "segment_grid": np.zeros((n_rows, n_seg, 3), np.int32),
         "placement": np.zeros((len(samples), 2), np.int32)}
  if "cond" in first:
    out["cond_tokens"] = np.zeros((n_rows, seq_len, pv * c), np.float32)
    out["cond_mask_tokens"] = np.zeros((n_rows, seq_len, pv * first["cond_mask"].shape[-1]),
                                       np.float32)
  if "image" in first:
    out["image"] = np.zeros((n_rows, image_len, first["image"].shape[-1]), np.float32)
    out["image_segment_ids"] = np.zeros((n_rows, image_len), np.int32)
  fill = np.zeros((n_rows, 4), np.int64)  # tokens, text, image, segments used per row
  for i, (s, r, (grid, n_tok, n_text, n_img)) in enumerate(zip(samples, rows, sizes)):
    t0, l0, m0, seg = fill[r, 0], fill[r, 1], fill[r, 2], fill[r, 3] + 1
    tok = slice(t0, t0 + n_tok)
    out["tokens"][r, tok] = patchify(s["latents"], patch_size)
    out["positions"][r, tok] = positions(grid)
    out["segment_ids"][r, tok] = seg
    out["text"][r, l0:l0 + n_text] = s["text"]
    out["text_segment_ids"][r, l0:l0 + n_text] = seg
    if "cond" in s:
      out["cond_tokens"][r, tok] = patchify(s["cond"], patch_size)
      out["cond_mask_tokens"][r, tok] = patchify(s["cond_mask"], patch_size)
    if "image" in s:
      out["image"][r, m0:m0 + n_img] = s["image"]
      out["image_segment_ids"][r, m0:m0 + n_img] = seg
    out["segment_grid"][r, seg - 1] = grid
    out["placement"][i] = r, seg
    fill[r] += (n_tok, n_text, n_img, 1)
  return out


def unpack(values, packed: dict, patch_size, channels: int) -> list[np.ndarray]:
  """Per-sample videos from packed token values, in the order of `pack`'s samples.

  values: (R, S, pv * channels), e.g. forward_packed's prediction; packed: `pack`'s output.
  Returns a list of (F, H, W, channels) NumPy arrays.
  """
  values, grids = np.asarray(values), packed["segment_grid"]
  starts = np.concatenate([np.zeros_like(grids[:, :1, 0]),
                           np.cumsum(np.prod(grids, axis=-1), axis=1)], axis=1)
  out = []
  for r, seg in packed["placement"]:
    grid, start = tuple(grids[r, seg - 1]), starts[r, seg - 1]
    out.append(unpatchify(values[r, start:start + math.prod(grid)], grid, patch_size, channels))
  return out


def concat_channels(parts, patch_volume: int):
  """Tokens of one clip layout with their channels concatenated inside each patch element.

  parts: arrays (..., S, patch_volume * C_i). Returns (..., S, patch_volume * sum(C_i)), equal
  to patchifying the channel concatenation of the videos (conditioning's concat kind:
  [x_t, cond_mask, cond]).
  """
  split = [p.reshape(*p.shape[:-1], patch_volume, p.shape[-1] // patch_volume) for p in parts]
  joined = jnp.concatenate(split, axis=-1)
  return joined.reshape(*joined.shape[:-2], -1)


def segment_mean(values, segment_ids, num_segments: int):
  """Mean of per-token values over each segment: (B, S), (B, S) int -> (B, num_segments).

  Column k is segment k + 1 (padding, id 0, counts nowhere); an empty segment gives 0. The
  sums are exact float32 (no matmul, whose default TPU precision would round to bfloat16).
  """
  member = segment_ids[..., None] == jnp.arange(1, num_segments + 1)
  sums = jnp.sum(jnp.where(member, values[..., None], 0.0), axis=1)
  return sums / jnp.maximum(jnp.sum(member, axis=1), 1).astype(sums.dtype)


def segment_broadcast(per_segment, segment_ids):
  """Per-segment values onto their tokens: (B, K), (B, S) int -> (B, S); 0 on padding."""
  padded = jnp.concatenate([jnp.zeros_like(per_segment[:, :1]), per_segment], axis=1)
  return jnp.take_along_axis(padded, segment_ids, axis=1)
