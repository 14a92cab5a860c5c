"""Decoding: small clips whose frame i is a flat grey of level 7 i + 10, written here in every
container and codec the data pipeline reads, so a decoded frame names its own frame number."""

import fractions
import io
import pathlib
import subprocess

import av
import numpy as np
import pytest
from PIL import Image

from wan.data import video
from wan.errors import BadSample

N, H, W = 33, 48, 64  # 33 = 8 * 4 + 1 frames


def _level(i):
  return 7 * i + 10  # 10 .. 234: 7 apart, wider than lossy codecs' error on flat grey


def _frame_numbers(frames):
  """Frame number of each decoded frame, from its mean grey level."""
  return np.rint((frames.reshape(len(frames), -1).mean(-1) - 10) / 7).astype(int).tolist()


def _encode(path, codec, fps=16, pix_fmt="yuv420p", options=None, rotation=None, n=N,
            image=None):
  with av.open(str(path), "w") as container:
    stream = container.add_stream(codec, rate=fractions.Fraction(fps))
    stream.width, stream.height, stream.pix_fmt = W, H, pix_fmt
    stream.options = options or {}
    if rotation is not None:
      stream.set_display_rotation(rotation)
    for i in range(n):
      rgb = np.full((H, W, 3), _level(i), np.uint8) if image is None else image
      for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
        container.mux(packet)
    for packet in stream.encode():
      container.mux(packet)
  return path


# name -> (file name, codec, fps, pix_fmt, encoder options)
_VIDEOS = {
    "ffv1": ("lossless.mkv", "ffv1", 16, "bgr0", None),
    "x264rgb": ("lossless.mp4", "libx264rgb", 16, "rgb24", {"crf": "0"}),
    "h264": ("lossy.mp4", "libx264", 24, "yuv420p", {"crf": "18"}),  # B-frames: reordered
    "mov": ("lossy.mov", "libx264", 16, "yuv420p", None),
    "vp9": ("lossy.webm", "libvpx-vp9", 16, "yuv420p", {"deadline": "realtime", "cpu-used": "8"}),
}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  d = tmp_path_factory.mktemp("media")
  out = {k: _encode(d / f, codec, fps, pix, opts)
         for k, (f, codec, fps, pix, opts) in _VIDEOS.items()}
  # GIF delays are in 1/100 s: 10 fps is exact. Pillow keeps grey levels exact in the palette.
  greys = [Image.new("L", (W, H), _level(i)) for i in range(N)]
  out["gif"] = d / "anim.gif"
  greys[0].save(out["gif"], save_all=True, append_images=greys[1:], duration=100, loop=0)
  out["rot90"] = _encode(d / "rotated.mp4", "libx264rgb", pix_fmt="rgb24", options={"crf": "0"},
                         rotation=90, n=3, image=_corner_image())
  return out


def _corner_image():
  rgb = np.zeros((H, W, 3), np.uint8)
  rgb[:16, :16] = 255  # white top-left corner
  return rgb


@pytest.mark.parametrize("name, fps", [("ffv1", 16), ("x264rgb", 16), ("h264", 24), ("mov", 16),
                                       ("vp9", 16), ("gif", 10)])
def test_probe_and_read_are_frame_exact(files, name, fps):
  path = files[name]
  assert video.probe(path) == video.Info(num_frames=N, fps=fps, height=H, width=W, kind="video")
  every = video.read(path)
  assert every.shape == (N, H, W, 3) and every.dtype == np.uint8
  assert _frame_numbers(every) == list(range(N))
  lossless = name in ("ffv1", "x264rgb", "gif")
  assert np.abs(every[5].astype(int) - _level(5)).max() <= (0 if lossless else 3)
  # Any order, repeats (up-sampled frame rates), the last frame.
  asked = [5, 0, 32, 5, 7, 7, 31]
  assert _frame_numbers(video.read(path, asked)) == asked
  assert video.read(path, []).shape == (0, H, W, 3)


def test_bytes_and_pathlike_sources(files):
  data = files["h264"].read_bytes()
  assert video.probe(data) == video.probe(files["h264"]) == video.probe(str(files["h264"]))
  assert _frame_numbers(video.read(data, [3, 1])) == [3, 1]
  assert _frame_numbers(video.read(files["vp9"].read_bytes(), np.array([30]))) == [30]


def test_frame_count_ignores_frames_an_edit_list_drops(tmp_path):
  # Cutting without re-encoding starts the MP4 at the keyframe before the cut and marks the
  # frames before the cut as discarded: the container counts them (17), the decoder does not.
  imageio_ffmpeg = pytest.importorskip("imageio_ffmpeg")
  source = _encode(tmp_path / "gop8.mp4", "libx264", options={"crf": "18", "g": "8", "bf": "2"})
  cut = tmp_path / "cut.mp4"
  subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-ss", "1.2", "-i", str(source),
                  "-c", "copy", str(cut)], check=True)
  with av.open(str(cut)) as container:
    assert container.streams.video[0].frames == 17
  info, every = video.probe(cut), video.read(cut)
  assert info.num_frames == len(every) == 13
  assert _frame_numbers(every) == list(range(20, 33))


def test_rotation_is_applied(files):
  # A 90 degree (counter-clockwise) display rotation: upright is 64 x 48, the source's top-left
  # corner at the bottom-left (as ffmpeg's autorotate shows it).
  assert video.probe(files["rot90"]) == video.Info(3, 16.0, W, H, "video")
  (upright,) = video.read(files["rot90"], [2])
  assert upright.shape == (W, H, 3)
  assert upright[-16:, :16].min() == 255 and upright[:-16].max() == 0


def test_images_are_rgb_one_frame_clips(tmp_path):
  rgb = np.random.default_rng(0).integers(0, 256, (H, W, 3), np.uint8)
  grey = np.arange(H * W, dtype=np.uint16).reshape(H, W) * 21  # up to 64491
  palette = Image.new("P", (W, H), 1)
  palette.putpalette([0, 0, 0, 200, 100, 50])
  palette.info["transparency"] = 0
  images = {  # file -> (image, expected RGB)
      "rgb.png": (Image.fromarray(rgb), rgb),
      "rgba.png": (Image.fromarray(np.dstack([rgb, np.full((H, W), 7, np.uint8)])), rgb),
      "grey.png": (Image.fromarray(rgb[..., 0]), np.repeat(rgb[..., :1], 3, -1)),
      "grey16.png": (Image.fromarray(grey),  # 16 bits scaled to 8, not clipped at 255
                     np.repeat((grey >> 8).astype(np.uint8)[..., None], 3, -1)),
      "palette.png": (palette, np.broadcast_to(np.array([200, 100, 50], np.uint8), (H, W, 3))),
      "lossless.webp": (Image.fromarray(rgb), rgb),
  }
  for file, (img, want) in images.items():
    img.save(tmp_path / file, **({"lossless": True} if file.endswith("webp") else {}))
    assert video.probe(tmp_path / file) == video.Info(1, 0.0, H, W, "image"), file
    got = video.read(tmp_path / file)
    assert got.shape == (1, H, W, 3) and got.dtype == np.uint8
    np.testing.assert_array_equal(got[0], want, err_msg=file)
  Image.fromarray(np.full((H, W, 3), 120, np.uint8)).save(tmp_path / "flat.jpg", quality=95)
  assert np.abs(video.read(tmp_path / "flat.jpg").astype(int) - 120).max() <= 2
  assert video.read((tmp_path / "rgb.png").read_bytes(), [0, 0]).shape == (2, H, W, 3)
  with pytest.raises(BadSample, match="asked for frame 1 of a 1-frame clip"):
    video.read(tmp_path / "rgb.png", [0, 1])


def test_jpeg_exif_orientation(tmp_path):
  # Orientation 6: the camera stored the picture turned; upright it is taller than wide.
  exif = Image.Exif()
  exif[0x0112] = 6
  Image.fromarray(_corner_image()).save(tmp_path / "phone.jpg", exif=exif, quality=95)
  assert video.probe(tmp_path / "phone.jpg") == video.Info(1, 0.0, W, H, "image")
  (upright,) = video.read(tmp_path / "phone.jpg")
  assert upright[:16, -16:].min() > 200  # turned clockwise: top-left corner to top-right


def test_kind_of():
  assert [video.kind_of(p) for p in ("a.MP4", "b.webm", "c.gif", "d.JPeG", "e.webp", "f.txt",
                                     "noext", pathlib.Path("g.mkv"))] == \
      ["video", "video", "video", "image", "image", None, None, "video"]


def _audio_only(path):
  with av.open(str(path), "w") as container:
    stream = container.add_stream("pcm_s16le", rate=8000)
    frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
    frame.sample_rate = 8000
    for packet in [*stream.encode(frame), *stream.encode()]:
      container.mux(packet)
  return path


def test_bad_files_raise_bad_sample_with_a_reason(files, tmp_path):
  (tmp_path / "empty.mp4").write_bytes(b"")
  (tmp_path / "notes.mp4").write_text("these are my notes, not a video\n" * 20)
  (tmp_path / "notes.png").write_text("not a picture either\n" * 20)
  whole = files["h264"].read_bytes()
  (tmp_path / "cut.mp4").write_bytes(whole[: len(whole) // 2])  # index (moov) is at the end
  (tmp_path / "noise.webm").write_bytes(np.random.default_rng(0).bytes(5000))
  jpeg = io.BytesIO()
  Image.fromarray(_corner_image()).save(jpeg, format="JPEG")
  (tmp_path / "cut.jpg").write_bytes(jpeg.getvalue()[:300])
  cases = {
      tmp_path / "missing.mp4": "file not found",
      tmp_path / "empty.mp4": r"empty file \(0 bytes\)",
      tmp_path / "notes.mp4": "not a decodable video or image",
      tmp_path / "notes.png": "not a decodable image: not an image format Pillow knows",
      tmp_path / "cut.mp4": "not a decodable video or image",
      tmp_path / "noise.webm": "not a decodable video or image",
      tmp_path / "cut.jpg": "not a decodable image",
      _audio_only(tmp_path / "sound.mkv"): "no video stream",
      tmp_path: "a directory",
  }
  for path, reason in cases.items():
    for call in (video.probe, video.read):
      with pytest.raises(BadSample, match=reason) as caught:
        call(path)
      assert caught.value.path == str(path)
  with pytest.raises(BadSample, match="empty file"):
    video.read(b"")
  with pytest.raises(BadSample, match=f"asked for frame 40 of a {N}-frame clip") as caught:
    video.read(files["vp9"], [3, 40])
  assert caught.value.path == str(files["vp9"])
  with pytest.raises(BadSample, match="^row 7: not a decodable"):  # a name for in-memory data
    video.probe(b"junk" * 100, name="row 7")
  with pytest.raises(ValueError, match="indices must be >= 0"):
    video.read(files["ffv1"], [-1])
