"""Writing generated videos and images: MP4, PNG, contact sheets and GIFs for TensorBoard.

    media.write_mp4("out/cat.mp4", video, fps=16)            # video: (F, H, W, 3) float in [0, 1]
    media.write_png("out/cat.png", media.contact_sheet(video))
    gif = media.gif_bytes(video, fps=16)                     # for a TensorBoard image summary

Files are encoded in memory, written under a temporary sibling name and renamed into place (on
local disk or in a bucket, through wan.fs): a reader never sees a partial file, and a failed write
leaves nothing at the destination. Reading a video back is wan.data.video's job (`read` for the
frames, `probe` for the frame rate).
"""

import fractions
import io

import av
import imageio.v3 as iio
import numpy as np

from wan import fs

# Encoders to try in order: libx264 is in PyAV's wheels, mpeg4 in every FFmpeg build. crf 18 is
# x264's "visually lossless"; mpeg4's fixed quantiser 2 (global_quality = 2 x FF_QP2LAMBDA)
# is its finest usual setting (PyAV ignores option names the codec lacks, so "qscale" would not do).
_ENCODERS = (
    ("libx264", {"crf": "18", "preset": "medium"}),
    ("mpeg4", {"flags": "+qscale", "global_quality": str(2 * 118)}),
)


def to_uint8(video) -> np.ndarray:
  """Floats in [0, 1] to uint8, rounded (x * 255 + 0.5) and clipped; uint8 passes through.

  video: any shape, e.g. (F, H, W, 3) or (H, W, 3). Raises ValueError on NaN or infinity (a
  diverged sample), which has no pixel value.
  """
  video = np.asarray(video)
  if video.dtype == np.uint8:
    return video
  if video.dtype.kind in "biu":  # 0..255 or 0..1? Only uint8 says which.
    raise ValueError(f"pixels must be floats in [0, 1] or uint8, got dtype {video.dtype}")
  video = video.astype(np.float32)  # bfloat16 too
  if not np.isfinite(video).all():
    raise ValueError("pixels must be finite, got NaN or infinity (did the sample diverge?)")
  return np.floor(np.clip(video * 255 + 0.5, 0, 255)).astype(np.uint8)


def _video_uint8(video) -> np.ndarray:
  """(F, H, W, 3) uint8 of a (F, H, W, 3) float or uint8 video, or a ValueError naming the shape."""
  shape = np.shape(video)
  if len(shape) != 4 or shape[-1] != 3 or 0 in shape:
    raise ValueError(f"a video must be (frames, height, width, 3) RGB, got shape {shape}"
                     + (" (one image? add a frame axis: image[None])" if len(shape) == 3 else ""))
  return to_uint8(video)


def _frame_rate(fps: float) -> fractions.Fraction:
  if not (np.isfinite(fps) and fps > 0):
    raise ValueError(f"fps must be a positive number, got {fps}")
  return fractions.Fraction(fps).limit_denominator(1001)  # 23.976 and 24000/1001 stay exact


def _write_atomically(path, data: bytes):
  """Writes `data` to `path` under a temporary sibling name, renamed into place when complete."""
  tmp = fs.sibling(path, "tmp")
  try:
    with fs.open_file(tmp, "wb") as f:
      f.write(data)
    fs.replace(tmp, path)
  finally:
    if fs.exists(tmp):
      fs.remove(tmp)


def _encoder() -> tuple[str, dict]:
  for name, options in _ENCODERS:
    try:
      av.codec.Codec(name, "w")
      return name, options
    except av.codec.codec.UnknownCodecError:
      continue
  raise RuntimeError(f"this PyAV build has none of the video encoders {[n for n, _ in _ENCODERS]}")


def mp4_bytes(video, fps: float) -> bytes:
  """An MP4 (H.264 yuv420p, crf 18; MPEG-4 part 2 where PyAV lacks libx264) of one video.

  video: (F, H, W, 3) float in [0, 1] or uint8. fps may be fractional (23.976). yuv420p stores
  colour at half resolution, so an odd height or width is padded to even by repeating the last
  row or column: a (F, 21, 33, 3) video is written (and decodes) as 22 x 34.
  """
  video = _video_uint8(video)
  rate = _frame_rate(fps)
  video = np.pad(video, ((0, 0), (0, video.shape[1] % 2), (0, video.shape[2] % 2), (0, 0)),
                 mode="edge")
  codec, options = _encoder()
  buffer = io.BytesIO()
  with av.open(buffer, "w", format="mp4") as container:
    stream = container.add_stream(codec, rate=rate, options=options)
    stream.height, stream.width, stream.pix_fmt = video.shape[1], video.shape[2], "yuv420p"
    for index, rgb in enumerate(video):
      frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
      frame.pts = index  # in the stream's time base, 1 / rate
      container.mux(stream.encode(frame))
    container.mux(stream.encode(None))  # what the encoder still holds (B-frames, lookahead)
  return buffer.getvalue()


def write_mp4(path, video, fps: float) -> None:
  """Writes one video as an MP4 file, atomically (see `mp4_bytes` for the format and odd sizes).

  path: local or bucket (gs://...); its directory must exist. video: (F, H, W, 3) float in [0, 1]
  or uint8.
  """
  _write_atomically(path, mp4_bytes(video, fps))


def contact_sheet(video, max_frames: int = 16, columns: int | None = None) -> np.ndarray:
  """Evenly spaced frames, first and last included, in a grid: (rows*H, columns*W, 3) uint8.

  video: (F, H, W, 3) float in [0, 1] or uint8. Shows min(F, max_frames) frames in `columns`
  columns (default ceil(sqrt(n)), a near-square sheet); the cells after the last frame are black.
  """
  video = _video_uint8(video)
  if max_frames < 1 or (columns is not None and columns < 1):
    raise ValueError(f"max_frames and columns must be >= 1, got {max_frames} and {columns}")
  count, height, width, _ = video.shape
  n = min(count, max_frames)
  chosen = video[np.round(np.linspace(0, count - 1, n)).astype(int)]
  columns = columns or int(np.ceil(np.sqrt(n)))
  rows = -(-n // columns)
  cells = np.zeros((rows * columns, height, width, 3), np.uint8)
  cells[:n] = chosen
  return cells.reshape(rows, columns, height, width, 3).swapaxes(1, 2).reshape(
      rows * height, columns * width, 3)


def write_png(path, image) -> None:
  """Writes one image as a PNG file, atomically. image: (H, W, 3) uint8 (or float in [0, 1])."""
  shape = np.shape(image)
  if len(shape) != 3 or shape[-1] != 3 or 0 in shape:
    raise ValueError(f"an image must be (height, width, 3) RGB, got shape {shape}")
  _write_atomically(path, iio.imwrite("<bytes>", to_uint8(image), extension=".png"))


def gif_bytes(video, fps: float) -> bytes:
  """An endlessly looping animated GIF of one video (TensorBoard's image plugin animates GIFs).

  video: (F, H, W, 3) float in [0, 1] or uint8. GIF stores 256 colours per frame and delays in
  hundredths of a second, so colours are approximate and fps is rounded to what the delay allows.
  Pillow merges identical consecutive frames into one longer frame (same playback).
  """
  video = _video_uint8(video)
  delay_ms = 1000 / float(_frame_rate(fps))
  return iio.imwrite("<bytes>", video, extension=".gif", plugin="pillow", duration=delay_ms,
                     loop=0)
