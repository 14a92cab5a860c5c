"""wan/data/sources.py: every source format read from tiny files (names only: nothing decodes)."""

import dataclasses
import io
import json
import os

import pytest

from wan import errors
from wan.data import sources

DEFAULTS = sources.Settings(height=480, width=832)


def touch(path, text=""):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    f.write(text)
  return str(path)


def test_folder_with_captions_sorted_and_missing_caption_reported(tmp_path):
  touch(tmp_path / "b.mp4")
  touch(tmp_path / "b.txt", "  a dog runs \n")
  touch(tmp_path / "a.PNG")
  touch(tmp_path / "a.txt", "a cat")
  touch(tmp_path / "c.webm")  # no c.txt
  touch(tmp_path / "notes.md", "ignored")
  touch(tmp_path / "orphan.txt", "caption without a clip")
  (ds,) = sources.read(str(tmp_path), DEFAULTS)
  assert ds.source == str(tmp_path)
  assert ds.settings == DEFAULTS
  assert ds.items == (
      sources.Item(str(tmp_path / "a.PNG"), "a cat", "image"),
      sources.Item(str(tmp_path / "b.mp4"), "a dog runs", "video"),
      sources.Item(str(tmp_path / "c.webm"), None, "video"),
  )
  assert ds.problems == ((str(tmp_path / "c.webm"), "no caption (c.txt)"),)


def test_folder_caption_extension_from_settings(tmp_path):
  touch(tmp_path / "a.mp4")
  touch(tmp_path / "a.caption", "from .caption")
  touch(tmp_path / "a.txt", "from .txt")
  ds = sources.read_folder(str(tmp_path), dataclasses.replace(DEFAULTS, caption_extension=".caption"))
  assert ds.items[0].caption == "from .caption"


def test_folder_is_not_recursive_and_reports_subfolders_with_clips(tmp_path):
  touch(tmp_path / "top.mp4")
  touch(tmp_path / "top.txt", "top")
  touch(tmp_path / "sub" / "deep.mp4")
  touch(tmp_path / "sub" / "deep.txt", "deep")
  touch(tmp_path / "other" / "readme.md")
  ds = sources.read_folder(str(tmp_path), DEFAULTS)
  assert [i.path for i in ds.items] == [str(tmp_path / "top.mp4")]
  assert len(ds.problems) == 1 and ds.problems[0][0] == str(tmp_path / "sub")
  assert "one level deep" in ds.problems[0][1]


def test_folder_missing_or_empty(tmp_path):
  with pytest.raises(errors.MissingFile, match="does not exist"):
    sources.read(str(tmp_path / "nope"), DEFAULTS)
  touch(tmp_path / "empty" / "readme.md")
  with pytest.raises(errors.MissingFile, match="no usable video or image"):
    sources.read(str(tmp_path / "empty"), DEFAULTS)


@pytest.mark.parametrize("column, name, kind", [("video", "clip.mp4", "video"),
                                                ("image", "pic.jpg", "image")])
def test_csv_diffsynth_style(tmp_path, column, name, kind):
  touch(tmp_path / "data" / name)
  touch(tmp_path / "data" / "metadata.csv",
        f'{column},prompt\n{name},"a caption, with a comma"\nmissing.mp4,gone\n')
  (ds,) = sources.read(str(tmp_path / "data"), DEFAULTS)  # a folder with metadata.csv
  assert ds.source == str(tmp_path / "data" / "metadata.csv")
  assert ds.items == (sources.Item(str(tmp_path / "data" / name), "a caption, with a comma", kind),)
  assert ds.problems == ((str(tmp_path / "data" / "missing.mp4"), "file not found (row 3)"),)


def test_csv_custom_columns_and_missing_columns(tmp_path):
  touch(tmp_path / "clips" / "x.mov")
  csv_path = touch(tmp_path / "list.csv", "\ufeffclip,description,extra\nclips/x.mov,hello,1\n")
  (ds,) = sources.read(csv_path, DEFAULTS, image_column="clip", caption_column="description")
  assert ds.items == (sources.Item(str(tmp_path / "clips" / "x.mov"), "hello", "video"),)
  with pytest.raises(errors.ConfigError, match=r"no file column.*'clip', 'description'.*image_column"):
    sources.read(csv_path, DEFAULTS)
  with pytest.raises(errors.ConfigError, match="no caption column.*caption_column"):
    sources.read(csv_path, DEFAULTS, image_column="clip")


def test_jsonl_with_malformed_lines(tmp_path):
  touch(tmp_path / "v" / "a.mp4")
  touch(tmp_path / "i" / "b.webp")
  lines = [
      json.dumps({"video_path": "v/a.mp4", "caption": "video a"}),
      "{not json",
      "",
      json.dumps({"image_path": str(tmp_path / "i" / "b.webp"), "caption": "image b"}),
      json.dumps(["a", "list"]),
      json.dumps({"caption": "no path"}),
      json.dumps({"video_path": "v/a.mp4"}),
  ]
  path = touch(tmp_path / "meta.jsonl", "\n".join(lines) + "\n")
  (ds,) = sources.read(path, DEFAULTS)
  assert ds.items == (
      sources.Item(str(tmp_path / "v" / "a.mp4"), "video a", "video"),
      sources.Item(str(tmp_path / "i" / "b.webp"), "image b", "image"),
      sources.Item(str(tmp_path / "v" / "a.mp4"), None, "video"),
  )
  where = [p for p, _ in ds.problems]
  assert where == [f"{path}:2", f"{path}:5", f"{path}:6", str(tmp_path / "v" / "a.mp4")]
  assert ds.problems[0][1].startswith("not JSON")
  assert ds.problems[3][1] == "no caption (line 7)"


def test_jsonl_control_entries_refused(tmp_path):
  touch(tmp_path / "a.png")
  path = touch(tmp_path / "m.jsonl", json.dumps(
      {"image_path": "a.png", "control_path": "c.png", "caption": "x"}) + "\n")
  with pytest.raises(errors.ConfigError, match="control_path.*not supported"):
    sources.read_jsonl(path, DEFAULTS)


MUSUBI_TOML = """
[general]
resolution = [960, 544]
caption_extension = ".caption"
batch_size = 2
enable_bucket = true

[[datasets]]
video_directory = "videos"
cache_directory = "/somewhere/cache_video"
target_frames = [45, 1, 25, 25]
frame_extraction = "slide"
frame_stride = 10
source_fps = 30.0
max_frames = 97
num_repeats = 3
bucket_no_upscale = true

[[datasets]]
image_jsonl_file = "images/meta.jsonl"
cache_directory = "/somewhere/cache_image"
resolution = 512
batch_size = 4
"""


def test_musubi_toml_general_and_two_datasets(tmp_path):
  touch(tmp_path / "videos" / "v1.mp4")
  touch(tmp_path / "videos" / "v1.caption", "video one")
  touch(tmp_path / "videos" / "still.png")  # musubi reads only videos from a video_directory
  touch(tmp_path / "images" / "p.jpg")
  touch(tmp_path / "images" / "meta.jsonl", json.dumps({"image_path": "p.jpg", "caption": "pic"}))
  path = touch(tmp_path / "dataset.toml", MUSUBI_TOML)
  video, image = sources.read(path, DEFAULTS)

  assert video.source == str(tmp_path / "videos")
  assert video.settings == sources.Settings(
      height=544, width=960, enable_bucket=True, bucket_no_upscale=True,
      target_frames=(1, 25, 45), frame_extraction="slide", frame_stride=10, frame_sample=1,
      max_frames=97, source_fps=30.0, num_repeats=3, batch_size=2, caption_extension=".caption")
  assert video.items == (sources.Item(str(tmp_path / "videos" / "v1.mp4"), "video one", "video"),)
  assert [p for p, _ in video.problems] == [str(tmp_path / "videos" / "still.png")]

  assert image.source == str(tmp_path / "images" / "meta.jsonl")
  assert image.settings == dataclasses.replace(
      DEFAULTS, height=512, width=512, enable_bucket=True, batch_size=4,
      caption_extension=".caption")  # the rest from the run's defaults
  assert image.items == (sources.Item(str(tmp_path / "images" / "p.jpg"), "pic", "image"),)
  assert image.problems == ()


@pytest.mark.parametrize("body, match", [
    ('[[datasets]]\nvideo_directory = "v"\ntarget_frame = [1]\n',
     r"unknown key 'target_frame'; known keys: .*target_frames"),
    ('[general]\nresolutions = 512\n[[datasets]]\nvideo_directory = "v"\n',
     r"\[general\]: unknown key 'resolutions'"),
    ('[[datasets]]\nimage_directory = "v"\ncontrol_directory = "c"\n',
     "control_directory is a musubi-tuner key .* does not support"),
    ('[[datasets]]\nvideo_directory = "v"\nfp_latent_window_size = 9\n', "does not support"),
    ('[[datasets]]\nimage_directory = "v"\ntarget_frames = [1]\n', "video setting"),
    ('[[datasets]]\nvideo_directory = "v"\nimage_directory = "v"\n', "exactly one of"),
    ('[general]\nresolution = 512\n', "no data sets"),
    ('[[datasets]]\nvideo_directory = "v"\nframe_extraction = "random"\n',
     "head, chunk, slide, uniform, full"),
    ('[[datasets]]\nvideo_directory = "v"\nresolution = [1, 2, 3]\n', r"\[width, height\]"),
    ('[[datasets]]\nvideo_directory = "v"\nnum_repeats = 0\n', ">= 1"),
    ('[[datasets]]\nvideo_directory = "v"\ncaption_extension = "txt"\n', "with its dot"),
])
def test_musubi_toml_errors(tmp_path, body, match):
  touch(tmp_path / "v" / "a.mp4")
  path = touch(tmp_path / "d.toml", body)
  with pytest.raises(errors.ConfigError, match=match):
    sources.read(path, DEFAULTS)


def test_musubi_toml_missing_source_folder(tmp_path):
  path = touch(tmp_path / "d.toml", '[[datasets]]\nvideo_directory = "nowhere"\n')
  with pytest.raises(errors.MissingFile, match=r"#1 \(video_directory\).*nowhere does not exist"):
    sources.read(path, DEFAULTS)


def test_validate_settings():
  assert sources.validate(DEFAULTS, "x") == DEFAULTS
  for bad, match in [({"height": 0}, "height=0"), ({"target_frames": ()}, "target_frames"),
                     ({"target_frames": (81, -3)}, "target_frames"),
                     ({"frame_extraction": "tail"}, "head, chunk"),
                     ({"source_fps": -1.0}, "source_fps"), ({"batch_size": -1}, "batch_size")]:
    with pytest.raises(errors.ConfigError, match=match):
      sources.validate(dataclasses.replace(DEFAULTS, **bad), "x")


def test_unknown_file_type(tmp_path):
  with pytest.raises(errors.ConfigError, match="cannot read .yaml"):
    sources.read(touch(tmp_path / "d.yaml"), DEFAULTS)


def _png() -> bytes:
  from PIL import Image
  buffer = io.BytesIO()
  Image.new("RGB", (4, 4), (255, 0, 0)).save(buffer, "PNG")
  return buffer.getvalue()


def test_hf_saved_dataset_carries_bytes(tmp_path):
  datasets = pytest.importorskip("datasets")
  png = _png()
  ds = datasets.Dataset.from_dict({"image": [png, png], "text": ["red square", None]})
  ds.cast_column("image", datasets.Image()).save_to_disk(str(tmp_path / "hf"))
  out = sources.read_hf(str(tmp_path / "hf"), "train", "image", "text", DEFAULTS)
  name = f"{tmp_path / 'hf'}[train]"
  assert out.source == name
  assert out.items == (sources.Item(f"{name}[0]", "red square", "image", png),
                       sources.Item(f"{name}[1]", None, "image", png))
  assert out.problems == ((f"{name}[1]", "no caption (row 1)"),)
  with pytest.raises(errors.ConfigError, match=r"no column 'caption' \(caption_column\); it has image, text"):
    sources.read_hf(str(tmp_path / "hf"), "train", "image", "caption", DEFAULTS)


def test_hf_split_paths_and_missing(tmp_path):
  datasets = pytest.importorskip("datasets")
  touch(tmp_path / "hf" / "clips" / "a.mp4")
  rows = datasets.Dataset.from_dict({"file": ["clips/a.mp4", "clips/gone.mp4"], "text": ["a", "b"]})
  datasets.DatasetDict({"train": rows}).save_to_disk(str(tmp_path / "hf"))
  out = sources.read_hf(str(tmp_path / "hf"), "train", "file", "text", DEFAULTS)
  assert out.items == (sources.Item(str(tmp_path / "hf" / "clips" / "a.mp4"), "a", "video"),)
  assert out.problems == ((str(tmp_path / "hf" / "clips" / "gone.mp4"), "file not found (row 1)"),)
  with pytest.raises(errors.ConfigError, match="no split 'test'; it has train"):
    sources.read_hf(str(tmp_path / "hf"), "test", "file", "text", DEFAULTS)
  with pytest.raises(errors.MissingFile, match="not a path on this machine"):
    sources.read_hf("someone/some-dataset", "train", "image", "text", DEFAULTS)


def test_hf_video_column_read_undecoded(tmp_path):
  datasets = pytest.importorskip("datasets")
  rows = datasets.Dataset.from_dict({"clip": [{"bytes": b"not really mp4", "path": "a.mp4"}],
                                     "caption": ["a clip"]})
  rows.cast_column("clip", datasets.Video()).save_to_disk(str(tmp_path / "hf"))
  out = sources.read_hf(str(tmp_path / "hf"), "train", "clip", "caption", DEFAULTS)
  assert out.items == (sources.Item(f"{tmp_path / 'hf'}[train][0]", "a clip", "video",
                                    b"not really mp4"),)
