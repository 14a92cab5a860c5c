"""Aspect-ratio buckets: the frame sizes a data set's clips are resized and cropped to.

Buckets keep the area of the target size (height x width) while their aspect ratios vary, in
steps of `step` pixels (the VAE's spatial factor x the transformer's patch: 16 for the Wan 2.1
VAE, 32 for the Wan 2.2 VAE), so every bucket encodes to whole transformer patches. A clip goes
to the bucket whose aspect ratio is nearest to its own (in log ratio, so 2:1 and 1:2 are as far
from 1:1), is scaled to cover it and centre-cropped. With `no_upscale`, a clip smaller than its
bucket gets a bucket of its own size instead (rounded down to the step), never a larger one.
"""

import math

import numpy as np
from PIL import Image

MAX_ASPECT = 4.0  # buckets span aspect ratios 1:4 .. 4:1


def make(height: int, width: int, step: int) -> list[tuple[int, int]]:
  """Buckets (h, w) of about the area height x width: for each width in steps of `step`, the
  tallest height (a multiple of `step`) whose area does not exceed it, within MAX_ASPECT."""
  area = height * width
  out = set()
  for w in range(step, int(math.sqrt(area * MAX_ASPECT)) + step, step):
    h = area // w // step * step
    if h >= step and 1 / MAX_ASPECT <= w / h <= MAX_ASPECT:
      out.add((h, w))
  if height % step == 0 and width % step == 0:
    out.add((height, width))  # the target itself is always a bucket
  return sorted(out)


def assign(height: int, width: int, buckets, step: int, no_upscale: bool = False):
  """The bucket (h, w) of a clip of height x width pixels."""
  ratio = math.log(width / height)
  h, w = min(buckets, key=lambda b: (abs(math.log(b[1] / b[0]) - ratio), -b[0] * b[1]))
  if no_upscale and h * w > height * width:
    # The clip's own size at the bucket's aspect ratio, rounded down to whole steps.
    scale = math.sqrt(height * width / (h * w))
    h, w = max(step, int(h * scale) // step * step), max(step, int(w * scale) // step * step)
    h, w = min(h, height // step * step), min(w, width // step * step)
  return h, w


def fixed(height: int, width: int, target_h: int, target_w: int, step: int,
          no_upscale: bool = False):
  """Without buckets every clip is resized to the target, or (no_upscale) to the largest size of
  the target's aspect ratio that the clip covers."""
  target = (max(step, target_h // step * step), max(step, target_w // step * step))
  return assign(height, width, [target], step, no_upscale)


def too_small(height: int, width: int, step: int) -> str | None:
  """Why a clip cannot be used at all, or None."""
  if height < step or width < step:
    return f"too small ({width}x{height} px; needs at least {step}x{step})"
  return None


def resize_crop(frames: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """frames: (N, H, W, 3) uint8 -> (N, h, w, 3) uint8: scaled to cover `size` (h, w) keeping the
  aspect ratio, then centre-cropped. Area filtering when shrinking (no aliasing), Lanczos when
  enlarging."""
  n, src_h, src_w, _ = frames.shape
  h, w = size
  scale = max(h / src_h, w / src_w)
  new_h, new_w = max(h, round(src_h * scale)), max(w, round(src_w * scale))
  top, left = (new_h - h) // 2, (new_w - w) // 2
  method = Image.Resampling.BOX if scale < 1 else Image.Resampling.LANCZOS
  out = np.empty((n, h, w, 3), np.uint8)
  for i in range(n):
    image = Image.fromarray(frames[i])
    if (new_h, new_w) != (src_h, src_w):
      image = image.resize((new_w, new_h), method)
    out[i] = np.asarray(image)[top:top + h, left:left + w]
  return out
