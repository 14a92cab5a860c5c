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
model input [x_t, cond_mask, cond] in token space and `model_inputs` every conditioning kind
(wan/conditioning.py's, on tokens); `unpack` returns per-clip videos. Training packs a whole
epoch at once (`epoch_rows`, from token counts alone) and `pack`s each batch's rows as planned.
"""

import math

import jax.numpy as jnp
import numpy as np

# One implementation of the token order: wan/video_tokens.py's, which the transformer uses.
from wan.video_tokens import grid_positions as positions  # noqa: F401  (part of this API)
from wan.video_tokens import patchify, unpatchify  # noqa: F401  (part of this API)


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


def first_fit(needs, capacity) -> tuple[list[int], int]:
  """(row of each item, rows used): each item, in order, goes into the first row with room.

  needs: per item, a tuple of what it takes (e.g. tokens, caption tokens, image tokens, 1
  segment); capacity: what a row holds, one entry per need. A row that lacked room for a need
  vector lacks it for good (rows only fill up), so one pointer per distinct need vector walks
  the rows forward once: O(items + rows x distinct needs), exactly first fit.
  """
  capacity = tuple(capacity)
  used, rows, first = [], [], {}  # first[need]: no row before it has room for need
  for need in needs:
    need = tuple(need)
    r = first.get(need, 0)
    while r < len(used) and any(u + n > c for u, n, c in zip(used[r], need, capacity)):
      r += 1
    if r == len(used):
      used.append((0,) * len(capacity))
    used[r] = tuple(u + n for u, n in zip(used[r], need))
    first[need] = r
    rows.append(r)
  return rows, len(used)


def epoch_rows(counts: dict, patch_size, seq_len: int, seed: int, epoch: int,
               shuffle: bool) -> list[list[int]]:
  """The packed rows of one epoch, a pure function of (counts, seed, epoch).

  counts: {latent shape (F, H, W, C): samples in the epoch, repeats included}. The epoch's
  sample slots are numbered bucket after bucket (buckets sorted) and shuffled with
  (seed, epoch) when `shuffle`; then packed first fit, in that order, into rows of `seq_len`
  tokens. Only token counts decide a row: the captions, images and segments of a row always fit
  (wan/plan_data.py sizes them for the most clips a row can hold). Returns the slots of each
  row, in row order.
  """
  sizes = [math.prod(f // k for f, k in zip(shape[:3], patch_size))
           for shape, n in sorted(counts.items()) for _ in range(n)]
  order = np.arange(len(sizes))
  if shuffle:
    order = np.random.default_rng([seed, epoch]).permutation(len(sizes))
  rows, n_rows = first_fit([(sizes[j],) for j in order], (seq_len,))
  out = [[] for _ in range(n_rows)]
  for j, r in zip(order, rows):
    out[r].append(int(j))
  return out


def _check_rows(sizes, rows, seq_len, text_len, image_len, max_segments):
  """Given rows (a caller's own first fit): each row's clips must fit it."""
  if len(rows) != len(sizes):
    raise ValueError(f"rows names the row of {len(rows)} samples; there are {len(sizes)}")
  used = {}
  for r, (_, n_tok, n_text, n_img) in zip(rows, sizes):
    u = used.setdefault(r, [0, 0, 0, 0])
    u[:] = u[0] + n_tok, u[1] + n_text, u[2] + n_img, u[3] + 1
  for r, u in sorted(used.items()):
    for what, have, room in (("tokens", u[0], seq_len), ("caption tokens", u[1], text_len),
                             ("image tokens", u[2], image_len), ("segments", u[3], max_segments)):
      if have > room:
        raise ValueError(f"row {r} is given {have} {what}; a row holds {room}")
  return max(rows) + 1


def pack(samples: list[dict], seq_len: int, text_len: int, patch_size, image_len: int = 0, *,
         num_rows: int | None = None, max_segments: int | None = None, rows=None) -> dict:
  """Packs clips into rows of `seq_len` tokens by first fit, keeping the order of `samples`.

  samples: dicts of NumPy arrays {"latents": (F, H, W, C), "text": (L_i, D) at the caption's
    own length, optional "cond": (F, H, W, C) with "cond_mask": (F, H, W, 4), optional
    "image": (257, D_image)}; clips may all differ in (F, H, W) and L_i.
  seq_len, text_len, image_len: tokens, caption tokens and image tokens per row.
  num_rows, max_segments: fix the number of rows (empty rows are all padding) and of segments
    per row, so that every batch has the same shapes (one compilation); None: as many as used.
  rows: the row of each sample, when the caller packed them already (the loader packs a whole
    epoch, `epoch_rows`); None: first fit here.
  Returns the arrays of the module docstring. Raises ValueError for a sample that does not fit
  an empty row (naming the seq_len, text_len or image_len it needs) or more rows than num_rows.
  """
  if not samples:
    raise ValueError("pack needs at least one sample")
  sizes = _sizes(samples, patch_size, seq_len, text_len, image_len)
  if rows is None:
    rows, n_rows = first_fit([(n_tok, n_text, n_img, 1) for _, n_tok, n_text, n_img in sizes],
                             (seq_len, text_len, image_len, max_segments or len(samples)))
  else:
    rows = [int(r) for r in rows]
    n_rows = _check_rows(sizes, rows, seq_len, text_len, image_len, max_segments or len(samples))
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


def model_inputs(kind: str, x_t, t, batch: dict, patch_volume: int):
  """`conditioning.model_inputs` on packed rows: (model input, timestep, loss tokens or None).

  x_t: (B, S, pv * C) noisy tokens; t: (B, S) per-token timesteps; batch: the packed batch
  (wan/data/batch.py: tokens, positions, cond_tokens, cond_mask_tokens). Returns the input
  (B, S, pv * C_in), the timesteps (B, S) and, for first_frame, a (B, S) bool mask of the tokens
  the loss counts (every clip's first latent frame is left out: it is the clean image).
  """
  if kind == "concat":
    return concat_channels([x_t, batch["cond_mask_tokens"].astype(x_t.dtype),
                            batch["cond_tokens"].astype(x_t.dtype)], patch_volume), t, None
  if kind == "first_frame":
    # Frame 0 of each clip's own token grid is its first latent frame (temporal patch 1,
    # checked with the family): clean, at timestep 0, out of the loss.
    first = batch["positions"][..., 0] == 0
    x_t = jnp.where(first[..., None], batch["tokens"].astype(x_t.dtype), x_t)
    return x_t, jnp.where(first, 0.0, t), ~first
  if kind == "none":
    return x_t, t, None
  raise ValueError(f"conditioning kind {kind!r} is not one of none, concat, first_frame")


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
