"""Writing videos and images: MP4 round trips through the project's decoder (wan.data.video) at
integer and fractional frame rates and odd sizes, the H.264 -> MPEG-4 fallback, contact sheets,
PNG, GIF, atomic writes and the errors of bad input."""

import os
import uuid

import av
import imageio.v3 as iio
import numpy as np
import pytest

from wan import fs, media
from wan.data import video as decoder


def _gradient(frames, height, width):
  """A smooth colour gradient drifting right and down: (F, H, W, 3) float32 in [0.1, 0.9]."""
  t = np.arange(frames)[:, None, None, None] / max(frames - 1, 1)
  y = np.linspace(0, 1, height)[None, :, None, None]
  x = np.linspace(0, 1, width)[None, None, :, None]
  v = 0.1 + 0.8 * (0.5 * x + 0.3 * y + 0.2 * t) * np.array([1.0, 0.8, 0.6])
  return v.astype(np.float32)


@pytest.mark.parametrize("fps", [16, 24, 23.976])
@pytest.mark.parametrize("shape, stored", [((9, 48, 64), (48, 64)), ((7, 21, 33), (22, 34))])
def test_mp4_round_trip(tmp_path, fps, shape, stored):
  video = _gradient(*shape)
  path = str(tmp_path / "clip.mp4")
  media.write_mp4(path, video, fps)
  assert os.listdir(tmp_path) == ["clip.mp4"]  # no temporary file left
  info = decoder.probe(path)
  assert (info.num_frames, info.height, info.width) == (shape[0], *stored)
  assert info.fps == pytest.approx(fps, rel=1e-6)
  frames = decoder.read(path).astype(np.int32)
  h, w = shape[1:]
  error = np.abs(frames[:, :h, :w] / 255.0 - video).mean()
  assert error < 4 / 255, error
  # An odd size was padded by repeating the last row / column (near, not equal: lossy codec).
  assert np.abs(frames[:, h:] - frames[:, h - 1:h]).max(initial=0) <= 4
  assert np.abs(frames[:, :, w:] - frames[:, :, w - 1:w]).max(initial=0) <= 4
  with av.open(path) as container:
    assert container.streams.video[0].codec_context.name == "h264"


def test_mp4_falls_back_to_mpeg4_without_libx264(tmp_path, monkeypatch):
  monkeypatch.setattr(media, "_ENCODERS", (("libx264-missing", {}),) + media._ENCODERS[1:])
  video = _gradient(5, 32, 48)
  path = str(tmp_path / "clip.mp4")
  media.write_mp4(path, video, 24)
  with av.open(path) as container:
    assert container.streams.video[0].codec_context.name == "mpeg4"
  assert np.abs(decoder.read(path) / 255.0 - video).mean() < 4 / 255


def test_mp4_through_a_bucket_path():
  bucket = f"ram://wan-test-{uuid.uuid4().hex}"  # tf.io.gfile's in-memory stand-in for gs://
  fs.makedirs(bucket)
  try:
    path = fs.join(bucket, "clip.mp4")
    media.write_mp4(path, _gradient(3, 16, 16), 16)
    assert fs.listdir(bucket) == ["clip.mp4"]
    assert decoder.probe(fs.read_bytes(path)).num_frames == 3
  finally:
    fs.rmtree(bucket)


def test_to_uint8_rounds_and_clips():
  x = np.array([-0.1, 0.0, 0.49 / 255, 0.51 / 255, 0.5, 1.0, 1.3], np.float32)
  np.testing.assert_array_equal(media.to_uint8(x), [0, 0, 0, 1, 128, 255, 255])
  u = np.arange(256, dtype=np.uint8)
  assert media.to_uint8(u) is u


def test_contact_sheet_picks_evenly_spaced_frames():
  video = media.to_uint8(np.random.default_rng(0).random((9, 4, 6, 3)))
  sheet = media.contact_sheet(video, max_frames=5)  # frames 0, 2, 4, 6, 8 in 3 columns, 2 rows
  assert sheet.shape == (2 * 4, 3 * 6, 3) and sheet.dtype == np.uint8
  cells = [sheet[r * 4:(r + 1) * 4, c * 6:(c + 1) * 6] for r in range(2) for c in range(3)]
  for cell, frame in zip(cells, [0, 2, 4, 6, 8]):
    np.testing.assert_array_equal(cell, video[frame])
  assert not cells[5].any()  # the unused cell is black
  row = media.contact_sheet(video, max_frames=16, columns=9)  # fewer frames than max: all
  np.testing.assert_array_equal(row, np.concatenate(list(video), axis=1))


def test_png_round_trip_is_exact(tmp_path):
  image = media.to_uint8(np.random.default_rng(1).random((5, 7, 3)))
  path = str(tmp_path / "sheet.png")
  media.write_png(path, image)
  assert os.listdir(tmp_path) == ["sheet.png"]
  np.testing.assert_array_equal(iio.imread(path), image)


def test_gif_has_every_frame():
  video = _gradient(6, 24, 32)
  gif = media.gif_bytes(video, fps=16)
  frames = iio.imread(gif, index=None, mode="RGB")
  assert frames.shape == (6, 24, 32, 3)
  assert np.abs(frames / 255.0 - video).mean() < 4 / 255  # 256 colours a frame
  assert iio.immeta(gif)["duration"] == 60  # 62.5 ms, in GIF's hundredths of a second


def test_failed_writes_raise_and_leave_no_file(tmp_path, monkeypatch):
  path = str(tmp_path / "clip.mp4")
  with open(path, "wb") as f:
    f.write(b"earlier")
  video = _gradient(3, 16, 16)
  with pytest.raises(ValueError, match=r"\(frames, height, width, 3\).*image\[None\]"):
    media.write_mp4(path, video[0], 16)
  with pytest.raises(ValueError, match="finite"):
    media.write_mp4(path, np.where(video > 0.5, np.nan, video), 16)
  with pytest.raises(ValueError, match="fps"):
    media.write_mp4(path, video, 0)
  with pytest.raises(ValueError, match=r"\(height, width, 3\)"):
    media.write_png(str(tmp_path / "x.png"), video)

  def broken_replace(src, dst):
    raise OSError("disk full")
  monkeypatch.setattr(fs, "replace", broken_replace)  # fails after the temporary file is whole
  with pytest.raises(OSError, match="disk full"):
    media.write_mp4(path, video, 16)
  monkeypatch.undo()
  assert os.listdir(tmp_path) == ["clip.mp4"] and open(path, "rb").read() == b"earlier"

  (tmp_path / "a_file").write_bytes(b"")
  with pytest.raises(OSError):  # its "directory" is a file: no temporary file can be made
    media.write_png(str(tmp_path / "a_file" / "x.png"), video[0])
  assert sorted(os.listdir(tmp_path)) == ["a_file", "clip.mp4"]
