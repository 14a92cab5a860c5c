"""Decoding videos and images to RGB frames, frame-accurately.

    info = probe("clip.mp4")                    # Info(num_frames=121, fps=24.0, height=480, ...)
    frames = read("clip.mp4", [0, 2, 4, 4, 6])  # (5, 480, 832, 3) uint8, frame 4 twice

Videos (and GIFs) decode in-process with PyAV, which numbers every frame it outputs, so a frame
number means the same frame in `probe` and `read`; images decode with Pillow, which applies
their EXIF orientation (PyAV does not), and are 1-frame clips. A source is a path or the bytes of
an encoded file (a Hugging Face dataset row). A file that cannot be used raises
wan.errors.BadSample with a short reason, never a decoder's exception.
"""

import contextlib
import dataclasses
import io
import os
import struct

import av
import numpy as np
from PIL import Image, ImageOps

from wan.errors import BadSample

VIDEO_EXTENSIONS = (".mp4", ".webm", ".mov", ".mkv", ".gif")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")

# What decoders raise on bad data: PyAV's FFmpegError (and its OSError / EOFError / ValueError
# twins), Pillow's OSError / SyntaxError / struct.error on broken files, its bomb guard.
_DECODE_ERRORS = (av.error.FFmpegError, OSError, EOFError, ValueError, SyntaxError, struct.error,
                  Image.DecompressionBombError)


@dataclasses.dataclass(frozen=True)
class Info:
  """What a file holds, as `read` will return it (height and width after rotation)."""
  num_frames: int  # exact: the frames `read` can return, counted, never fps * duration
  fps: float  # average frame rate; 0.0 for images
  height: int
  width: int
  kind: str  # "video" | "image"


def kind_of(path) -> str | None:
  """"video" or "image" by the file's extension (any case), or None for any other file."""
  ext = os.path.splitext(os.fspath(path))[1].lower()
  if ext in VIDEO_EXTENSIONS:
    return "video"
  if ext in IMAGE_EXTENSIONS:
    return "image"
  return None


def _label(source, name) -> str:
  if name is not None:
    return str(name)
  if isinstance(source, (bytes, bytearray, memoryview)):
    return f"<{len(source)} bytes in memory>"
  return os.fspath(source)


def _file(source, label: str):
  """The path or bytes to decode, after the checks that need no decoder."""
  if isinstance(source, (bytes, bytearray, memoryview)):
    data = bytes(source)
    if not data:
      raise BadSample(label, "empty file (0 bytes)")
    return data
  path = os.fspath(source)
  if not os.path.exists(path):
    raise BadSample(label, "file not found")
  if os.path.isdir(path):
    raise BadSample(label, "a directory, not a video or image file")
  if os.path.getsize(path) == 0:
    raise BadSample(label, "empty file (0 bytes)")
  return path


def _is_image(file) -> bool:
  """Whether Pillow decodes it: PNG, JPEG or WebP by its first bytes (a name can lie), else a
  path with an image extension (Pillow names what is wrong with it better than FFmpeg)."""
  if isinstance(file, bytes):
    head = file[:12]
  else:
    with open(file, "rb") as f:
      head = f.read(12)
  return (head.startswith(b"\x89PNG\r\n\x1a\n") or head.startswith(b"\xff\xd8\xff")
          or (head[:4] == b"RIFF" and head[8:12] == b"WEBP")
          or (not isinstance(file, bytes) and kind_of(file) == "image"))


def _opened(file):
  return io.BytesIO(file) if isinstance(file, bytes) else file


def _why(error: Exception) -> str:
  if isinstance(error, Image.UnidentifiedImageError):
    return "not an image format Pillow knows"  # its message repeats the path
  text = getattr(error, "strerror", None) or str(error) or type(error).__name__
  text = text.splitlines()[0]
  return text if len(text) <= 120 else text[:117] + "..."


@contextlib.contextmanager
def _decoding(label: str, what: str):
  """Turns a decoder's exception into BadSample(label, "what: why")."""
  try:
    yield
  except BadSample:
    raise
  except _DECODE_ERRORS as e:
    raise BadSample(label, f"{what}: {_why(e)}") from e


# ---------------------------------------------------------------------------------------------
# Images


def _image_rgb(img: Image.Image) -> np.ndarray:
  """(H, W, 3) uint8 of any Pillow image mode."""
  if img.mode in ("I;16", "I;16L", "I;16B", "I"):
    # 16-bit grey: Pillow's convert("RGB") clips at 255 instead of scaling.
    grey = (np.clip(np.asarray(img, np.int64), 0, 65535) >> 8).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=-1)
  if img.mode == "P" and "transparency" in img.info:
    img = img.convert("RGBA")  # through RGBA: Pillow warns on palette transparency to RGB
  return np.asarray(img.convert("RGB"))


def _decode_image(file, label: str) -> np.ndarray:
  """(H, W, 3) uint8, upright by its EXIF orientation."""
  with _decoding(label, "not a decodable image"):
    with Image.open(_opened(file)) as img:
      return _image_rgb(ImageOps.exif_transpose(img))


# ---------------------------------------------------------------------------------------------
# Videos


@contextlib.contextmanager
def _video(file, label: str):
  """(container, its first video stream), closed on exit."""
  with _decoding(label, "not a decodable video or image"):
    container = av.open(_opened(file))
  try:
    if not container.streams.video:
      raise BadSample(label, "no video stream")
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"  # frame threads too: several times faster than slice threads alone
    yield container, stream
  finally:
    container.close()


def _frame_rgb(frame) -> np.ndarray:
  """(H, W, 3) uint8, turned upright when the stream carries a multiple-of-90 rotation."""
  rgb = frame.to_ndarray(format="rgb24")
  rotation = getattr(frame, "rotation", 0) or 0  # degrees counter-clockwise (display matrix)
  if rotation % 90 == 0 and rotation % 360:
    rgb = np.rot90(rgb, k=rotation // 90)
  return rgb


def _upright_size(frame) -> tuple[int, int]:
  rotation = getattr(frame, "rotation", 0) or 0
  if rotation % 180 == 90:
    return frame.width, frame.height
  return frame.height, frame.width


def _fps(stream) -> float:
  for rate in (stream.average_rate, stream.guessed_rate):
    if rate:
      return float(rate)
  return 0.0


def _probe_video(file, label: str) -> Info:
  with _video(file, label) as (container, stream), _decoding(label, "corrupt video"):
    # Count the packets (one per frame), skipping the empty flush packet and the pre-roll an
    # MP4 edit list drops: the container's own count is absent (WebM, MKV) or can disagree.
    count, first = 0, None
    for packet in container.demux(stream):
      if packet.size and not packet.is_discard:
        count += 1
      if first is None and packet.size:  # decode only up to the first frame: size, rotation
        first = next(iter(packet.decode()), None)
    if count == 0:
      raise BadSample(label, "no frames")
    if first is None:
      first = next(iter(stream.codec_context.decode(None)), None)  # frames still in the decoder
    if first is None:
      raise BadSample(label, f"corrupt video: none of its {count} frames decodes")
    height, width = _upright_size(first)
    return Info(num_frames=count, fps=_fps(stream), height=height, width=width, kind="video")


def _read_video(file, wanted, label: str) -> np.ndarray:
  """Decodes in order up to the last wanted frame. wanted: (N,) frame numbers, or None: all."""
  frames, out, last, count = [], None, -1, 0
  if wanted is not None:
    slots = {}  # frame number -> positions in the output
    for position, index in enumerate(wanted.tolist()):
      slots.setdefault(index, []).append(position)
    last = max(slots, default=0)
  with _video(file, label) as (container, stream), _decoding(label, "corrupt video"):
    for index, frame in enumerate(container.decode(stream)):
      count = index + 1
      if wanted is None:
        frames.append(_frame_rgb(frame))
        if frames[-1].shape != frames[0].shape:
          raise BadSample(label, f"frame size changes from {frames[0].shape[:2]} to "
                          f"{frames[-1].shape[:2]} at frame {index}")
      else:
        if out is None:
          out = np.empty((len(wanted), *_upright_size(frame), 3), np.uint8)
        if index in slots:
          rgb = _frame_rgb(frame)
          if rgb.shape != out.shape[1:]:
            raise BadSample(label, f"frame size changes from {out.shape[1:3]} to {rgb.shape[:2]} "
                            f"at frame {index}")
          out[slots[index]] = rgb
        if index >= last:
          break
  if count == 0:
    raise BadSample(label, "no frames")
  if wanted is None:
    return np.stack(frames)
  if last >= count:
    raise BadSample(label, f"asked for frame {last} of a {count}-frame clip")
  return out


# ---------------------------------------------------------------------------------------------
# Public


def probe(source, *, name: str | None = None) -> Info:
  """Frame count, frame rate and upright size of a video or image.

  source: a path, or the bytes of an encoded file. name: what BadSample calls the source
  (default: the path, or "<N bytes in memory>"). Decodes one frame, demuxes the rest.
  """
  label = _label(source, name)
  file = _file(source, label)
  if _is_image(file):
    height, width, _ = _decode_image(file, label).shape
    return Info(num_frames=1, fps=0.0, height=height, width=width, kind="image")
  return _probe_video(file, label)


def read(source, indices=None, *, name: str | None = None) -> np.ndarray:
  """Frames of a video or image: (N, H, W, 3) uint8 RGB, upright.

  indices: 0-based frame numbers in the order the decoder outputs frames (as `probe` counts
  them), in any order and with repeats (frame-rate up-sampling), one output frame each; None
  reads all. Decodes from the start and stops at the last frame asked for. An image is frame 0
  of a 1-frame clip. source and name as in `probe`.
  """
  label = _label(source, name)
  wanted = None
  if indices is not None:
    wanted = np.asarray(indices)
    if wanted.ndim != 1 or (wanted.size and wanted.dtype.kind not in "iu"):
      raise ValueError(f"indices must be a sequence of whole frame numbers, got {indices!r}")
    wanted = wanted.astype(np.int64)
    if wanted.size and wanted.min() < 0:
      raise ValueError(f"indices must be >= 0 (frame numbers from the start), got {wanted.min()}")
  file = _file(source, label)
  if not _is_image(file):
    return _read_video(file, wanted, label)
  image = _decode_image(file, label)
  if wanted is None:
    return image[None]
  if wanted.size and wanted.max() > 0:
    raise BadSample(label, f"asked for frame {wanted.max()} of a 1-frame clip (an image)")
  return np.repeat(image[None], len(wanted), axis=0)
