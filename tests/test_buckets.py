"""Aspect-ratio buckets: area kept, steps of the VAE x patch factor, nearest ratio, no upscale,
resize + centre crop."""

import math

import numpy as np

from wan.data import buckets


def test_buckets_keep_the_area_in_whole_steps():
  sizes = buckets.make(480, 832, 16)
  area = 480 * 832
  assert (480, 832) in sizes and (832, 480) in sizes
  for h, w in sizes:
    assert h % 16 == 0 and w % 16 == 0
    assert h * w <= area and h * w > area - 16 * w  # the tallest height that fits the area
    assert 1 / 4 <= w / h <= 4
  assert len(sizes) == len(set(sizes)) > 10


def test_buckets_for_hand_computed_sizes():
  # Area 64 x 64 = 4096 in steps of 16: w = 16 -> h = 4096 // 16 // 16 * 16 = 256 (ratio 1:16,
  # out); w = 32 -> 128 (1:4, in); 48 -> 80; 64 -> 64; 80 -> 48; 96 -> 32 (3:1); 112 -> 32;
  # 128 -> 32 (4:1); wider ones fall below 4:1 or a step.
  assert buckets.make(64, 64, 16) == [(32, 96), (32, 112), (32, 128), (48, 80), (64, 64),
                                      (80, 48), (128, 32)]


def test_assign_picks_the_nearest_aspect_ratio():
  sizes = buckets.make(480, 832, 16)
  for h, w in [(1080, 1920), (720, 1280), (1920, 1080), (500, 500), (300, 1200)]:
    bh, bw = buckets.assign(h, w, sizes, 16)
    best = min(abs(math.log((b[1] / b[0]) / (w / h))) for b in sizes)
    assert abs(abs(math.log((bw / bh) / (w / h))) - best) < 1e-12
  # 16:9 = 1.778: 480 x 832 (1.733, log distance 0.025) beats 464 x 848 (1.828, 0.028).
  assert buckets.assign(1080, 1920, sizes, 16) == (480, 832)


def test_no_upscale_keeps_small_clips_small():
  sizes = buckets.make(480, 832, 16)
  assert buckets.assign(200, 360, sizes, 16, no_upscale=True) == (192, 352)
  assert buckets.assign(200, 360, sizes, 16) == buckets.assign(2000, 3600, sizes, 16)
  assert buckets.fixed(100, 100, 64, 64, 16, no_upscale=True) == (64, 64)
  assert buckets.fixed(40, 40, 64, 64, 16, no_upscale=True) == (32, 32)
  assert buckets.fixed(40, 40, 64, 64, 16) == (64, 64)
  assert buckets.fixed(40, 40, 70, 70, 16) == (64, 64)  # a target off the step is rounded down
  assert buckets.too_small(12, 40, 16) and not buckets.too_small(16, 16, 16)


def test_resize_crop_covers_then_centre_crops():
  frames = np.zeros((2, 40, 100, 3), np.uint8)
  frames[:, :, 45:55] = 255  # a white bar in the centre
  frames[:, :, :10] = 100  # left edge, cropped away
  out = buckets.resize_crop(frames, (20, 20))
  assert out.shape == (2, 20, 20, 3) and out.dtype == np.uint8
  # Scaled by 1/2 to 20 x 50, then columns 15..35 kept: the bar lands at 7.5..12.5.
  assert out[:, :, 8:12].min() > 200 and out[:, :, :5].max() < 50
  up = buckets.resize_crop(frames[:, :10, :10], (32, 32))
  assert up.shape == (2, 32, 32, 3)
