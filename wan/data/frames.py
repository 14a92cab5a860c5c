"""Which frames of a clip become training samples: frame-rate conversion and musubi-tuner's
`frame_extraction` modes, as pure functions of frame counts (no IO).

The meanings are musubi-tuner's (src/musubi_tuner/dataset/image_video_dataset.py, VideoDataset,
and media_utils.load_video), so a musubi dataset TOML cuts the same clips here:

    shown = resample(num_frames, source_fps=30.0, target_fps=16.0)  # source frame per 16 fps step
    clips = extract(len(shown), (1, 25, 45), "head")                # indices into `shown`
    frames = [shown[c] for c in clips]                              # source frame numbers to read
"""

import fractions

import numpy as np

MODES = ("head", "chunk", "slide", "uniform", "full")


def valid_frame_count(n: int, temporal: int = 4) -> bool:
  """True for the clip lengths the Wan VAE encodes whole: temporal * k + 1 (1, 5, 9, ..., 81)."""
  return n >= 1 and (n - 1) % temporal == 0


def round_frames(n: int, temporal: int = 4) -> int:
  """The largest temporal * k + 1 <= n (musubi rounds target_frames and `full` clips down so)."""
  if n < 1:
    raise ValueError(f"a clip needs at least 1 frame, got {n}")
  return (n - 1) // temporal * temporal + 1


def _rational(fps: float) -> fractions.Fraction:
  # Frame rates are ratios of small integers (30000/1001); recovering the ratio from the float
  # makes "exactly on a source frame" exact instead of a rounding accident.
  return fractions.Fraction(fps).limit_denominator(1_000_000)


def resample(num_frames: int, source_fps: float, target_fps: float) -> np.ndarray:
  """The source frame shown at each step of the target frame rate: (M,) int64.

  Step k (time k / target_fps) shows the first source frame at or after that time, frame
  ceil(k * source_fps / target_fps), for every k whose frame exists: M = floor((num_frames - 1)
  * target_fps / source_fps) + 1, so the first and last shown frames span the source's time.
  Down-sampling so keeps the first source frame of each target step, which is musubi's rule
  (load_video with source_fps set); musubi sums the step in floating point, so at steps landing
  exactly on a source frame (30 -> 16 fps: step 8 is frame 15) it may pick the next frame (16).
  Up-sampling repeats frames (8 -> 16 fps: 0, 1, 1, 2, 2, ...), where musubi keeps every frame
  once and the clip plays faster. Identity when the rates are equal or source_fps <= 0 (unknown).
  """
  if num_frames < 0:
    raise ValueError(f"num_frames must be >= 0, got {num_frames}")
  if not target_fps > 0:
    raise ValueError(f"target_fps={target_fps}; use the model's frame rate (> 0, 16 for Wan)")
  if source_fps <= 0 or num_frames == 0:
    return np.arange(num_frames, dtype=np.int64)
  ratio = _rational(source_fps) / _rational(target_fps)  # source frames per target step
  a, b = ratio.numerator, ratio.denominator
  count = (num_frames - 1) * b // a + 1
  k = np.arange(count, dtype=np.int64)
  return -(-(k * a) // b)  # ceil(k * a / b) in integers


def _targets(target_frames) -> tuple[int, ...]:
  """musubi's target_frames: each rounded down to 4k+1, duplicates dropped, ascending."""
  if isinstance(target_frames, (int, np.integer)):
    target_frames = (target_frames,)
  values = tuple(target_frames)
  if not values or not all(isinstance(f, (int, np.integer)) and f >= 1 for f in values):
    raise ValueError(f"target_frames={values!r}; use whole numbers >= 1 of the form 4k+1, "
                     "e.g. (1, 25, 81)")
  return tuple(sorted({round_frames(int(f)) for f in values}))


def _check_positive(**values):
  for name, value in values.items():
    if not isinstance(value, (int, np.integer)) or value < 1:
      raise ValueError(f"{name}={value!r}; use a whole number >= 1")


def _starts(num_frames: int, length: int, mode: str, frame_stride: int, frame_sample: int):
  """First frames of the clips of one target length (none when the video is shorter)."""
  if num_frames < length:
    return []
  if mode == "head":
    return [0]
  if mode == "chunk":  # back-to-back pieces; a short tail is dropped
    return list(range(0, num_frames - length + 1, length))
  if mode == "slide":
    return list(range(0, num_frames - length + 1, frame_stride))
  # uniform: frame_sample starts spread evenly from the first to the last possible one, floored
  # as musubi's np.linspace(..., dtype=int); repeats when there are fewer starts than samples.
  # frame_sample=1 gives [0], the same clip as head (musubi switches the mode to head).
  return [int(s) for s in np.linspace(0, num_frames - length, frame_sample, dtype=np.int64)]


def extract(num_frames: int, target_frames, mode: str, *, frame_stride: int = 1,
            frame_sample: int = 1, max_frames: int = 129) -> list[np.ndarray]:
  """The clips musubi's `frame_extraction` cuts from a num_frames-frame video.

  Each clip is an (L,) int64 array of consecutive indices into the (resampled) frame sequence.
  Clips come per target length (target_frames rounded down to 4k+1, deduplicated, ascending),
  then by first frame; a target longer than the video yields no clip.
    head     the first L frames
    chunk    back-to-back L-frame pieces from frame 0 (frame_stride unused)
    slide    an L-frame window every frame_stride frames
    uniform  frame_sample windows, first frames evenly spaced from 0 to num_frames - L
    full     one clip of all frames, cut to max_frames and rounded down to 4k+1 (target_frames
             unused)
  """
  if mode not in MODES:
    raise ValueError(f"frame_extraction={mode!r}; use one of {', '.join(MODES)}")
  if not isinstance(num_frames, (int, np.integer)) or num_frames < 0:
    raise ValueError(f"num_frames must be a whole number >= 0, got {num_frames!r}")
  _check_positive(frame_stride=frame_stride, frame_sample=frame_sample, max_frames=max_frames)
  if mode == "full":
    if num_frames == 0:
      return []
    return [np.arange(round_frames(min(num_frames, max_frames)), dtype=np.int64)]
  clips = []
  for length in _targets(target_frames):
    for start in _starts(num_frames, length, mode, frame_stride, frame_sample):
      clips.append(np.arange(start, start + length, dtype=np.int64))
  return clips
