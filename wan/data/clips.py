"""From data-set items to clips: which frames of which file, at which frame size.

Every file is probed (header and frame count only); videos are resampled from their frame rate
(or the data set's source_fps) to the model's and cut into clips by the data set's frame
extraction; each clip gets its bucket. Files that cannot be used are returned as (path, reason)
pairs, never raised: one bad file must not stop a job.
"""

import dataclasses

import numpy as np

from wan.data import buckets as buckets_lib
from wan.data import frames as frames_lib
from wan.data import video
from wan.errors import BadSample


@dataclasses.dataclass(frozen=True)
class Clip:
  """One training sample before encoding."""
  item: object  # wan.data.sources.Item
  frames: tuple[int, ...]  # frame numbers of the file, in order (repeats after up-sampling)
  size: tuple[int, int]  # (height, width) pixels of its bucket
  repeats: int  # times it is seen per epoch (num_repeats)

  @property
  def key(self) -> str:
    """Unique within a data set: the file and its first frame and length."""
    return f"{self.item.path}@{self.frames[0]}+{len(self.frames)}"

  def latent_shape(self, vae_cfg) -> tuple[int, int, int, int]:
    """(F', H', W', C) of its latents."""
    t, s = vae_cfg.scale_factor_temporal, vae_cfg.scale_factor_spatial
    return ((len(self.frames) - 1) // t + 1, self.size[0] // s, self.size[1] // s,
            vae_cfg.z_dim)


def _source(item):
  return item.data if item.data is not None else item.path


def clips_of(item, settings, fps: float, step: int, bucket_sizes) -> list[Clip]:
  """The clips of one item (raises BadSample when there are none)."""
  info = video.probe(_source(item), name=item.path)
  small = buckets_lib.too_small(info.height, info.width, step)
  if small:
    raise BadSample(item.path, small)
  if bucket_sizes:
    size = buckets_lib.assign(info.height, info.width, bucket_sizes, step,
                              settings.bucket_no_upscale)
  else:
    size = buckets_lib.fixed(info.height, info.width, settings.height, settings.width, step,
                             settings.bucket_no_upscale)
  if info.kind == "image":
    return [Clip(item, (0,), size, settings.num_repeats)]
  source_fps = settings.source_fps or info.fps
  shown = frames_lib.resample(info.num_frames, source_fps, fps)
  picks = frames_lib.extract(len(shown), settings.target_frames, settings.frame_extraction,
                             frame_stride=settings.frame_stride,
                             frame_sample=settings.frame_sample, max_frames=settings.max_frames)
  if not picks:
    raise BadSample(item.path, f"too short: {info.num_frames} frames at {source_fps:g} fps are "
                               f"{len(shown)} at the model's {fps:g} fps; the clips need "
                               f"{min(settings.target_frames)}")
  return [Clip(item, tuple(int(i) for i in np.asarray(shown)[p]), size, settings.num_repeats)
          for p in picks]


def index(datasets, fps: float, step: int):
  """(clips, skipped) of data sets (wan.data.sources.DataSet): skipped is a list of
  (path, reason), including the data sets' own problems (files without a caption)."""
  found, skipped = [], []
  for ds in datasets:
    skipped.extend(tuple(p) for p in ds.problems)
    s = ds.settings
    sizes = buckets_lib.make(s.height, s.width, step) if s.enable_bucket else None
    for item in ds.items:
      if item.caption is None:
        continue  # reported in ds.problems
      try:
        found.extend(clips_of(item, s, fps, step, sizes))
      except BadSample as e:
        skipped.append((e.path, e.reason))
  return found, skipped


def bucket_counts(clips, vae_cfg) -> dict:
  """{latent shape (F', H', W', C): samples per epoch (with repeats)}, sorted."""
  counts = {}
  for clip in clips:
    shape = clip.latent_shape(vae_cfg)
    counts[shape] = counts.get(shape, 0) + clip.repeats
  return dict(sorted(counts.items()))


def read_pixels(clip: Clip) -> np.ndarray:
  """The clip's frames at its bucket size: (F, h, w, 3) uint8 (raises BadSample)."""
  frames = video.read(_source(clip.item), clip.frames, name=clip.item.path)
  return buckets_lib.resize_crop(frames, clip.size)
