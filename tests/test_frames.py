"""Frame-rate conversion and musubi-tuner's frame extraction modes, against index lists worked out
by hand from musubi's rules (src/musubi_tuner/dataset/image_video_dataset.py, VideoDataset, and
its docs/dataset_config.md pictures of a 40-frame video)."""

import numpy as np
import pytest

from wan.data import frames


def _spans(clips):
  """(first frame, length) of each clip, after checking it is consecutive frames."""
  for c in clips:
    assert c.dtype == np.int64 and (np.diff(c) == 1).all()
  return [(int(c[0]), len(c)) for c in clips]


def test_round_and_valid_frame_counts():
  # 4k+1 lengths: what the Wan VAE (temporal stride 4) encodes whole.
  assert [frames.round_frames(n) for n in (1, 2, 4, 5, 8, 9, 80, 81, 84)] == \
      [1, 1, 1, 5, 5, 9, 77, 81, 81]
  assert [n for n in range(1, 20) if frames.valid_frame_count(n)] == [1, 5, 9, 13, 17]
  assert not frames.valid_frame_count(0)
  with pytest.raises(ValueError, match="at least 1 frame"):
    frames.round_frames(0)


def test_head():
  # The first L frames for each target; musubi's picture for 40 frames and [1, 13, 25].
  clips = frames.extract(40, (1, 13, 25), "head")
  assert [c.tolist() for c in clips[:1]] == [[0]]
  assert _spans(clips) == [(0, 1), (0, 13), (0, 25)]
  # A target longer than the video gives no clip (45 > 40), the others still do.
  assert _spans(frames.extract(40, (45, 13), "head")) == [(0, 13)]
  assert frames.extract(10, (17,), "head") == []


def test_targets_are_rounded_down_to_4k_plus_1_deduplicated_and_sorted():
  # 24 -> 21, 25/26/28 -> 25, 29 -> 29: (21, 25, 29); 29 > 27 frames, so two clips.
  clips = frames.extract(27, (29, 24, 25, 26, 28), "head")
  assert _spans(clips) == [(0, 21), (0, 25)]
  assert frames.extract(7, 5, "head")[0].tolist() == [0, 1, 2, 3, 4]  # one int is one target


def test_chunk():
  # Back-to-back pieces from frame 0 while a whole piece fits: 13 -> starts 0, 13, 26 (26 + 13
  # = 39 <= 40; frame 39 left over); 25 -> start 0 only (25 + 25 > 40). musubi's picture.
  assert _spans(frames.extract(40, (13, 25), "chunk")) == [(0, 13), (13, 13), (26, 13), (0, 25)]
  # frame_stride means nothing to chunk.
  assert _spans(frames.extract(40, (13,), "chunk", frame_stride=5)) == [(0, 13), (13, 13), (26, 13)]
  # Target 1 turns every frame into a clip (musubi's docs warn about this).
  assert [c.tolist() for c in frames.extract(4, (1,), "chunk")] == [[0], [1], [2], [3]]
  assert frames.extract(16, (17,), "chunk") == []


def test_slide():
  # A window every frame_stride frames while it fits: starts range(0, 40 - L + 1, 10):
  # L=1 -> 0, 10, 20, 30; L=13 -> 0, 10, 20 (30 + 13 > 40); L=25 -> 0, 10. musubi's picture.
  assert _spans(frames.extract(40, (1, 13, 25), "slide", frame_stride=10)) == [
      (0, 1), (10, 1), (20, 1), (30, 1), (0, 13), (10, 13), (20, 13), (0, 25), (10, 25)]
  # Stride 1 (the default): every start 0 .. 7 - 5 = 2.
  assert [c.tolist() for c in frames.extract(7, (5,), "slide")] == [
      [0, 1, 2, 3, 4], [1, 2, 3, 4, 5], [2, 3, 4, 5, 6]]
  # Stride 3 over 10 frames, L=5: starts 0, 3 (6 + 5 > 10).
  assert _spans(frames.extract(10, (5,), "slide", frame_stride=3)) == [(0, 5), (3, 5)]
  assert frames.extract(4, (5,), "slide") == []


def test_uniform():
  # frame_sample starts at linspace(0, 40 - L, 4) floored: L=1 -> 0, 13, 26, 39; L=13 -> 0, 9,
  # 18, 27; L=25 -> 0, 5, 10, 15. musubi's picture.
  assert _spans(frames.extract(40, (1, 13, 25), "uniform", frame_sample=4)) == [
      (0, 1), (13, 1), (26, 1), (39, 1), (0, 13), (9, 13), (18, 13), (27, 13),
      (0, 25), (5, 25), (10, 25), (15, 25)]
  # Non-integer spacing floors: linspace(0, 23, 3) = 0, 11.5, 23 -> 0, 11, 23.
  assert _spans(frames.extract(40, (17,), "uniform", frame_sample=3)) == [
      (0, 17), (11, 17), (23, 17)]
  # More samples than starts repeat a clip: linspace(0, 2, 4) = 0, 0.67, 1.33, 2 -> 0, 0, 1, 2.
  assert _spans(frames.extract(27, (25,), "uniform", frame_sample=4)) == [
      (0, 25), (0, 25), (1, 25), (2, 25)]
  # frame_sample=1 is head (musubi switches the mode to head).
  assert _spans(frames.extract(40, (13,), "uniform")) == [(0, 13)]
  assert frames.extract(12, (13,), "uniform", frame_sample=4) == []


def test_full():
  # One clip from frame 0: min(frames, max_frames) rounded down to 4k+1. musubi's docs picture
  # (20, 25, 35 frames, max_frames=31): 20 -> 17, 25 -> 25, 35 -> min 31 -> 29 (the picture
  # says 31, but the code rounds after the cut, and 31 is not 4k+1).
  assert [_spans(frames.extract(n, (), "full", max_frames=31)) for n in (20, 25, 35)] == [
      [(0, 17)], [(0, 25)], [(0, 29)]]
  assert _spans(frames.extract(200, (1, 13), "full")) == [(0, 129)]  # target_frames unused
  assert [c.tolist() for c in frames.extract(3, (81,), "full")] == [[0]]  # 3 -> 1; never skipped
  assert frames.extract(0, (), "full") == []


def test_bad_arguments_say_what_to_use():
  with pytest.raises(ValueError, match="use one of head, chunk, slide, uniform, full"):
    frames.extract(40, (13,), "tail")
  with pytest.raises(ValueError, match="target_frames.*4k\\+1"):
    frames.extract(40, (0, 13), "head")
  with pytest.raises(ValueError, match="target_frames"):
    frames.extract(40, (), "head")
  with pytest.raises(ValueError, match="frame_stride=0; use a whole number >= 1"):
    frames.extract(40, (13,), "slide", frame_stride=0)
  with pytest.raises(ValueError, match="frame_sample"):
    frames.extract(40, (13,), "uniform", frame_sample=-1)
  with pytest.raises(ValueError, match="max_frames"):
    frames.extract(40, (), "full", max_frames=0)
  with pytest.raises(ValueError, match="target_fps"):
    frames.resample(10, 30.0, 0.0)


def test_resample():
  # Step k shows source frame ceil(k * source / target), for k = 0 .. floor((n-1) * target /
  # source). 30 -> 16: ceil(k * 15 / 8) -> 0, 1.875->2, 3.75->4, 5.625->6, 7.5->8, 9.375->10,
  # 11.25->12, 13.125->14, 15 exactly, 16.875->17, ...; 16 steps for 1 s. (musubi's float
  # accumulator lands at 7.9999 for step 8 and picks frame 16 there instead of 15.)
  assert frames.resample(30, 30.0, 16.0).tolist() == [
      0, 2, 4, 6, 8, 10, 12, 14, 15, 17, 19, 21, 23, 25, 27, 29]
  # 24 -> 16: ceil(1.5 k): keeps 2 of every 3 frames.
  assert frames.resample(24, 24.0, 16.0).tolist() == [
      0, 2, 3, 5, 6, 8, 9, 11, 12, 14, 15, 17, 18, 20, 21, 23]
  # 60 -> 16 over 16 frames: ceil(3.75 k) for k <= floor(15 * 16 / 60) = 4.
  assert frames.resample(16, 60.0, 16.0).tolist() == [0, 4, 8, 12, 15]
  # Equal rates, or an unknown source rate: every frame once.
  assert frames.resample(5, 16.0, 16.0).tolist() == [0, 1, 2, 3, 4]
  assert frames.resample(5, 0.0, 16.0).tolist() == [0, 1, 2, 3, 4]
  assert frames.resample(0, 30.0, 16.0).tolist() == []
  # 8 -> 16 up-samples: ceil(k / 2) for k <= 3 * 2 = 6: each frame twice but the first.
  assert frames.resample(4, 8.0, 16.0).tolist() == [0, 1, 1, 2, 2, 3, 3]
  # NTSC 29.97 = 30000/1001 is taken exactly: source / target = 1875/1001, so step 1001 is
  # exactly frame 1875; steps 1000 and 1002 round up from 1873.13 and 1876.87.
  shown = frames.resample(2000, 30000 / 1001, 16.0)
  assert shown[1000:1003].tolist() == [1874, 1875, 1877]
  assert len(shown) == 1068  # floor(1999 * 1001 / 1875) + 1


def test_resample_then_extract():
  # 40 frames at 30 fps are 21 steps at 16 fps (floor(39 * 8 / 15) + 1); head 17 takes the
  # first 17 of them, the source frames ceil(15 k / 8).
  shown = frames.resample(40, 30.0, 16.0)
  (clip,) = frames.extract(len(shown), (17,), "head")
  assert shown[clip].tolist() == [0, 2, 4, 6, 8, 10, 12, 14, 15, 17, 19, 21, 23, 25, 27, 29, 30]
