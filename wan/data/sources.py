"""Data set sources: a user's description of their data turned into items (file + caption) with
the settings that say how each data set's clips are cut and sized. Nothing is decoded here.

    data_sets = sources.read("/data/clips.toml", defaults)   # [DataSet(source, settings, items, problems)]

Formats (`read` picks by what the path is):
  folder        every video/image file in it (one level, not recursive, as musubi-tuner reads
                `video_directory` / `image_directory`) with a caption file of the same name:
                `clip.mp4` + `clip.txt` (the extension is Settings.caption_extension).
                A folder that holds `metadata.csv` is read as that CSV instead.
  .csv          DiffSynth-Studio's `metadata.csv`: a `video` or `image` column (or Hugging Face
                imagefolder's `file_name`) and a `prompt` column; `image_column` / `caption_column`
                name other columns.
  .jsonl        musubi-tuner's metadata: one `{"video_path": ..., "caption": ...}` or
                `{"image_path": ..., "caption": ...}` per line.
  .toml         musubi-tuner's dataset config: `[general]` plus `[[datasets]]` entries, each of the
                formats above with its own settings (see read_toml).
  Hugging Face  a data set on local disk (saved with `save_to_disk`, or a data folder that
                `datasets.load_dataset` reads), through read_hf.

Relative paths inside a CSV, JSONL or TOML file are relative to that file's directory (musubi
resolves them against the working directory; a config that works from anywhere is worth the
difference, and absolute paths read the same). A file that cannot be used (missing, no caption,
unknown extension, malformed line) is listed in DataSet.problems as (path, reason) and never stops
a job; a source that cannot be read at all, or yields no item, raises wan.errors.MissingFile or
ConfigError with what to change.
"""

import csv
import dataclasses
import json
import os
import tomllib

from wan import errors
from wan.data import frames
from wan.data.video import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, kind_of

# The extensions wan/data/video.py decodes (compared lower-cased).
FRAME_EXTRACTIONS = frames.MODES
KINDS = ("video", "image")


@dataclasses.dataclass(frozen=True)
class Settings:
  """How one data set's clips are cut and sized (musubi-tuner's [[datasets]] keys)."""
  height: int  # target frame size: the bucket area is height * width
  width: int
  enable_bucket: bool = False
  bucket_no_upscale: bool = False
  target_frames: tuple[int, ...] = (81,)
  frame_extraction: str = "head"  # head | chunk | slide | uniform | full
  frame_stride: int = 1
  frame_sample: int = 1
  max_frames: int = 129
  source_fps: float = 0.0  # 0: use the file's own frame rate
  num_repeats: int = 1
  batch_size: int = 0  # 0: the run's; musubi's per-device batch size otherwise
  caption_extension: str = ".txt"


@dataclasses.dataclass(frozen=True)
class Item:
  path: str  # absolute path of the video/image file (or a name for in-memory data)
  caption: str | None  # None: no caption was found (and DataSet.problems says so)
  kind: str  # "video" | "image"
  data: bytes | None = None  # the encoded file itself when it lives in memory (Hugging Face rows)


@dataclasses.dataclass(frozen=True)
class DataSet:
  source: str  # what it was read from, for messages and the cache manifest
  settings: Settings
  items: tuple[Item, ...]
  problems: tuple[tuple[str, str], ...]  # (path, reason): files skipped or without caption


# ---------------------------------------------------------------------------------------------
# Settings


def _is_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def validate(settings: Settings, where: str) -> Settings:
  """`settings` unchanged if every value is usable, else ConfigError naming `where` (the data set)
  and the values allowed."""
  s = settings

  def bad(field, allowed):
    raise errors.ConfigError(f"{where}: {field}={getattr(s, field)!r}; {allowed}")

  for field in ("height", "width", "frame_stride", "frame_sample", "max_frames", "num_repeats"):
    if not _is_int(getattr(s, field)) or getattr(s, field) < 1:
      bad(field, "use a whole number >= 1")
  if not _is_int(s.batch_size) or s.batch_size < 0:
    bad("batch_size", "use a whole number >= 1 (or 0 for the run's batch size)")
  for field in ("enable_bucket", "bucket_no_upscale"):
    if not isinstance(getattr(s, field), bool):
      bad(field, "use true or false")
  if (not isinstance(s.target_frames, tuple) or not s.target_frames
      or not all(_is_int(f) and f >= 1 for f in s.target_frames)):
    bad("target_frames", "use a list of whole numbers >= 1, e.g. [1, 25, 81]")
  if s.frame_extraction not in FRAME_EXTRACTIONS:
    bad("frame_extraction", f"use one of {', '.join(FRAME_EXTRACTIONS)}")
  if isinstance(s.source_fps, bool) or not isinstance(s.source_fps, (int, float)) or s.source_fps < 0:
    bad("source_fps", "use a frame rate > 0, or 0 for each file's own")
  if not isinstance(s.caption_extension, str) or not s.caption_extension.startswith(".") \
      or len(s.caption_extension) < 2:
    bad("caption_extension", 'use an extension with its dot, e.g. ".txt"')
  return s


# ---------------------------------------------------------------------------------------------
# Shared helpers


def _resolve(base_dir: str, path: str) -> str:
  return os.path.abspath(os.path.join(base_dir, os.path.expanduser(path)))


def _unknown_extension(path: str) -> str:
  return (f"not a video or image file (extension {os.path.splitext(path)[1] or 'none'!r}; "
          f"videos: {' '.join(VIDEO_EXTENSIONS)}, images: {' '.join(IMAGE_EXTENSIONS)})")


def _finish(source, settings, items, problems) -> DataSet:
  """The DataSet, or MissingFile when nothing in it can be used (an empty data set would only
  fail later, further from the cause)."""
  if not items:
    shown = "; ".join(f"{p}: {r}" for p, r in problems[:3])
    more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
    raise errors.MissingFile(
        f"{source}: no usable video or image in it" + (f": {shown}{more}" if shown else
        f" (looked for {' '.join(VIDEO_EXTENSIONS + IMAGE_EXTENSIONS)})"))
  return DataSet(source, validate(settings, source), tuple(items), tuple(problems))


def _require(path: str, what: str, isdir: bool = False):
  exists = os.path.isdir(path) if isdir else os.path.isfile(path)
  if not exists:
    found = " (it is a file)" if isdir and os.path.exists(path) else (
        " (it is a folder)" if os.path.exists(path) else "")
    raise errors.MissingFile(f"{what} {path} does not exist{found}; fix the path")


# ---------------------------------------------------------------------------------------------
# Readers


def read(path: str, defaults: Settings, *, image_column: str = "image",
         caption_column: str = "text") -> list[DataSet]:
  """The data sets that `path` describes: a folder (its `metadata.csv` if it has one, else its
  files with same-name captions), a .csv, .jsonl or .toml file. `defaults` are the run's
  settings, which a TOML file's keys override per data set."""
  path = os.path.abspath(os.path.expanduser(path))
  if os.path.isdir(path):
    metadata = os.path.join(path, "metadata.csv")
    if os.path.isfile(metadata):
      return [read_csv(metadata, defaults, image_column, caption_column)]
    return [read_folder(path, defaults)]
  if not os.path.exists(path):
    raise errors.MissingFile(f"data set {path} does not exist; give a folder of clips or a "
                             ".csv, .jsonl or .toml file")
  ext = os.path.splitext(path)[1].lower()
  if ext == ".csv":
    return [read_csv(path, defaults, image_column, caption_column)]
  if ext == ".jsonl":
    return [read_jsonl(path, defaults)]
  if ext == ".toml":
    return read_toml(path, defaults)
  raise errors.ConfigError(f"data set {path}: cannot read {ext or 'a file without extension'}; "
                           "give a folder of clips, a .csv (DiffSynth-Studio), .jsonl or .toml "
                           "(musubi-tuner) file")


def read_folder(directory: str, defaults: Settings, *, kinds=KINDS) -> DataSet:
  """Every file of `kinds` (by extension) directly in `directory`, sorted by name, each with the
  caption in `stem + caption_extension` (stripped of surrounding whitespace, as musubi does).
  A clip without caption file is kept with caption=None and reported. Subfolders are not read
  (musubi globs one level); one that holds clips is reported so they are not lost unnoticed."""
  directory = os.path.abspath(os.path.expanduser(directory))
  _require(directory, "folder", isdir=True)
  ext = defaults.caption_extension
  items, problems = [], []
  for entry in sorted(os.scandir(directory), key=lambda e: e.name):
    if entry.name.startswith("."):
      continue
    if entry.is_dir():
      try:
        holds_clips = any(kind_of(n) for n in os.listdir(entry.path))
      except OSError:
        holds_clips = False  # unreadable: not ours to read anyway
      if holds_clips:
        problems.append((entry.path, "subfolder not read: folders are read one level deep, as "
                                     "musubi-tuner does; list it as a data set of its own"))
      continue
    kind = kind_of(entry.name)
    if kind is None:
      continue  # caption files and anything else
    if kind not in kinds:
      problems.append((entry.path, f"{kind} in a folder of {' and '.join(kinds)}s: not read"))
      continue
    caption_name = os.path.splitext(entry.name)[0] + ext
    caption = _read_caption(os.path.join(directory, caption_name))
    if caption is None:
      problems.append((entry.path, f"no caption ({caption_name})"))
    elif isinstance(caption, UnicodeDecodeError):
      problems.append((entry.path, f"caption {caption_name} is not UTF-8 text"))
      caption = None
    items.append(Item(entry.path, caption, kind))
  return _finish(directory, defaults, items, problems)


def _read_caption(path: str):
  """The caption text, None when the file is missing, or the UnicodeDecodeError."""
  try:
    with open(path, encoding="utf-8") as f:
      return f.read().strip()
  except FileNotFoundError:
    return None
  except UnicodeDecodeError as e:
    return e


def _pick(columns, candidates):
  return next((c for c in candidates if c in columns), None)


def read_csv(path: str, defaults: Settings, image_column: str = "image",
             caption_column: str = "text") -> DataSet:
  """DiffSynth-Studio's metadata.csv. The file column is the first present of `image_column`,
  `video`, `image`, `file_name`; the caption column the first of `caption_column`, `prompt`.
  Paths are relative to the CSV's directory; the kind comes from the extension (or, for an
  unknown one, from a column named `video` / `image`)."""
  path = os.path.abspath(os.path.expanduser(path))
  _require(path, "CSV file")
  base = os.path.dirname(path)
  with open(path, encoding="utf-8-sig", newline="") as f:  # -sig: spreadsheets write a BOM
    reader = csv.DictReader(f)
    columns = [c.strip() for c in reader.fieldnames or []]
    reader.fieldnames = columns
    file_col = _pick(columns, (image_column, "video", "image", "file_name"))
    text_col = _pick(columns, (caption_column, "prompt"))
    if file_col is None or text_col is None:
      missing = ("file" if file_col is None else "caption")
      raise errors.ConfigError(
          f"{path}: no {missing} column; found columns {columns or 'none'}. DiffSynth-Studio "
          f"files have `video` (or `image`) and `prompt`; set image_column (now {image_column!r}) "
          f"to the column of file paths and caption_column (now {caption_column!r}) to the "
          "column of captions")
    items, problems = [], []
    for row_number, row in enumerate(reader, start=2):  # row 1 is the header
      where = f"{path}:{row_number}"
      value = (row.get(file_col) or "").strip()
      if not value:
        problems.append((where, f"empty {file_col!r}"))
        continue
      file = _resolve(base, value)
      kind = kind_of(file) or (file_col if file_col in KINDS else None)
      if kind is None:
        problems.append((file, _unknown_extension(file)))
        continue
      if not os.path.exists(file):
        problems.append((file, f"file not found (row {row_number})"))
        continue
      caption = row.get(text_col)
      if caption is None or not caption.strip():
        problems.append((file, f"no caption (empty {text_col!r}, row {row_number})"))
        caption = None
      items.append(Item(file, caption.strip() if caption else None, kind))
  return _finish(path, defaults, items, problems)


_JSONL_KEYS = {"video_path": "video", "image_path": "image"}


def read_jsonl(path: str, defaults: Settings, *, kinds=KINDS) -> DataSet:
  """musubi-tuner's metadata JSONL: `video_path` or `image_path` (relative to the file's
  directory; musubi allows a video_path that is a folder of frames) and `caption`. Blank lines
  are skipped; a line that is not a JSON object with one path is a problem (line number and
  reason). Control entries (`control_path...`) are refused: control training is not built."""
  path = os.path.abspath(os.path.expanduser(path))
  _require(path, "JSONL file")
  base = os.path.dirname(path)
  items, problems = [], []
  with open(path, encoding="utf-8") as f:
    for line_number, line in enumerate(f, start=1):
      where = f"{path}:{line_number}"
      if not line.strip():
        continue
      try:
        entry = json.loads(line)
      except json.JSONDecodeError as e:
        problems.append((where, f"not JSON ({e.msg} at column {e.colno})"))
        continue
      if not isinstance(entry, dict):
        problems.append((where, f"not a JSON object ({type(entry).__name__})"))
        continue
      if any(k.startswith("control_path") for k in entry):
        raise errors.ConfigError(f"{where}: control_path: control images/videos are not "
                                 "supported by this trainer; remove them from the file")
      keys = [k for k in _JSONL_KEYS if k in entry]
      if len(keys) != 1:
        problems.append((where, "needs one of video_path, image_path" if not keys
                         else "has both video_path and image_path; give one per line"))
        continue
      kind = _JSONL_KEYS[keys[0]]
      if kind not in kinds:
        problems.append((where, f"{keys[0]} in a file of {' and '.join(kinds)}s: not read"))
        continue
      if not isinstance(entry[keys[0]], str) or not entry[keys[0]]:
        problems.append((where, f"{keys[0]} is not a path"))
        continue
      file = _resolve(base, entry[keys[0]])
      if not os.path.exists(file):
        problems.append((file, f"file not found (line {line_number})"))
        continue
      caption = entry.get("caption")
      if not isinstance(caption, str):
        problems.append((file, "no caption" + (f" (line {line_number})" if caption is None else
                                               f" (caption is {type(caption).__name__}, "
                                               f"line {line_number})")))
        caption = None
      items.append(Item(file, caption.strip() if caption is not None else None, kind))
  return _finish(path, defaults, items, problems)


# ---------------------------------------------------------------------------------------------
# musubi-tuner dataset TOML

# Keys that set a Settings value, as musubi names them (its docs/dataset_config.md and
# src/musubi_tuner/dataset/config_utils.py).
_SETTING_KEYS = ("resolution", "caption_extension", "batch_size", "num_repeats", "enable_bucket",
                 "bucket_no_upscale", "target_frames", "frame_extraction", "frame_stride",
                 "frame_sample", "max_frames", "source_fps")
_VIDEO_KEYS = ("target_frames", "frame_extraction", "frame_stride", "frame_sample", "max_frames",
               "source_fps")
_SOURCE_KEYS = {"video_directory": "video", "video_jsonl_file": "video",
                "image_directory": "image", "image_jsonl_file": "image"}
# Accepted and ignored: our cache location is the run's tfrecords_dir, one per run, so
# musubi's per-data-set cache folder has nothing to choose.
_IGNORED_KEYS = ("cache_directory",)
# musubi keys of features this trainer does not have (control, FramePack, layered training).
_UNSUPPORTED_KEYS = ("control_directory", "multiple_target", "fp_latent_window_size",
                     "fp_1f_clean_indices", "fp_1f_target_index", "fp_1f_no_post",
                     "no_resize_control", "control_resolution", "flux_kontext_no_resize_control",
                     "qwen_image_edit_no_resize_control", "qwen_image_edit_control_resolution")


def _setting(key: str, value, where: str) -> dict:
  """The Settings fields that musubi key `key` = `value` sets, type-checked."""
  def bad(want):
    raise errors.ConfigError(f"{where}: {key} = {value!r}; {want}")

  if key == "resolution":  # musubi: [width, height], or one number for a square
    if _is_int(value):
      return {"width": value, "height": value}
    if isinstance(value, list) and len(value) == 2 and all(_is_int(v) for v in value):
      return {"width": value[0], "height": value[1]}
    bad("use [width, height], e.g. [832, 480], or one number for a square")
  if key == "target_frames":
    value_list = [value] if _is_int(value) else value
    if not isinstance(value_list, list) or not value_list or not all(_is_int(v) for v in value_list):
      bad("use a list of frame counts, e.g. [1, 25, 81]")
    return {key: tuple(sorted(set(value_list)))}  # musubi sorts and drops repeats
  if key == "source_fps":
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      bad("use a frame rate, e.g. 30.0")
    return {key: float(value)}  # musubi insists on 30.0; 30 means the same here
  if key in ("enable_bucket", "bucket_no_upscale"):
    if not isinstance(value, bool):
      bad("use true or false")
  elif key in ("caption_extension", "frame_extraction"):
    if not isinstance(value, str):
      bad("use a string")
  elif not _is_int(value):
    bad("use a whole number")
  return {key: value}


def _check_keys(table: dict, where: str, allowed):
  for key in table:
    if key in _UNSUPPORTED_KEYS:
      raise errors.ConfigError(
          f"{where}: {key} is a musubi-tuner key of a feature this trainer does not support "
          "(control images, FramePack one-frame or layered training); remove it")
    if key not in allowed:
      raise errors.ConfigError(f"{where}: unknown key {key!r}; known keys: {', '.join(allowed)}")


def read_toml(path: str, defaults: Settings) -> list[DataSet]:
  """musubi-tuner's dataset config. Each `[[datasets]]` entry names exactly one source
  (video_directory, video_jsonl_file, image_directory, image_jsonl_file) and is read by
  read_folder / read_jsonl restricted to that kind (musubi reads only videos from a video source).
  A setting is taken from the entry, else from `[general]`, else from `defaults` (the run's
  config; musubi's own fallbacks are its command line, then resolution (960, 544), batch size 1,
  target_frames (1,)). Unlike musubi, `[general]` may also hold the video keys (target_frames,
  frame_extraction, ...) for every video entry; an image entry may not set them. Unknown keys
  and keys of unsupported musubi features raise ConfigError; cache_directory is ignored."""
  path = os.path.abspath(os.path.expanduser(path))
  _require(path, "dataset config")
  base = os.path.dirname(path)
  try:
    with open(path, "rb") as f:
      config = tomllib.load(f)
  except tomllib.TOMLDecodeError as e:
    raise errors.ConfigError(f"{path}: not valid TOML ({e})") from None
  _check_keys(config, path, ("general", "datasets"))
  general = config.get("general", {})
  entries = config.get("datasets", [])
  if not isinstance(general, dict):
    raise errors.ConfigError(f"{path}: general must be a table ([general])")
  if not isinstance(entries, list) or not entries or not all(isinstance(e, dict) for e in entries):
    raise errors.ConfigError(f"{path}: no data sets; add one [[datasets]] table per data set "
                             "with video_directory, video_jsonl_file, image_directory or "
                             "image_jsonl_file")
  for key in general:
    if key in _SOURCE_KEYS or key in _IGNORED_KEYS:
      raise errors.ConfigError(f"{path} [general]: {key} belongs in each [[datasets]] entry")
  _check_keys(general, f"{path} [general]", _SETTING_KEYS)
  general_fields = {}
  for key, value in general.items():
    general_fields.update(_setting(key, value, f"{path} [general]"))

  return [_read_entry(entry, general_fields, defaults, base, f"{path} [[datasets]] #{number}")
          for number, entry in enumerate(entries, start=1)]


def _read_entry(entry: dict, general_fields: dict, defaults: Settings, base: str,
                where: str) -> DataSet:
  """One [[datasets]] table: its keys checked, its settings over [general]'s over the run's."""
  named = [k for k in _SOURCE_KEYS if k in entry]
  if len(named) != 1:
    raise errors.ConfigError(
        f"{where}: " + ("names no source" if not named else f"names {', '.join(named)}")
        + "; give exactly one of " + ", ".join(_SOURCE_KEYS))
  source_key = named[0]
  kind = _SOURCE_KEYS[source_key]
  allowed = _SETTING_KEYS + _IGNORED_KEYS + (source_key,)
  if kind == "image":  # as musubi's image schema: frame keys mean nothing for stills
    allowed = tuple(k for k in allowed if k not in _VIDEO_KEYS)
    for key in entry:
      if key in _VIDEO_KEYS:
        raise errors.ConfigError(f"{where}: {key} is a video setting; an image data set "
                                 f"({source_key}) has none, remove it")
  _check_keys(entry, where, allowed)
  if not isinstance(entry[source_key], str):
    raise errors.ConfigError(f"{where}: {source_key} = {entry[source_key]!r}; use a path")
  fields = dict(general_fields)
  for key, value in entry.items():
    if key in _SETTING_KEYS:
      fields.update(_setting(key, value, where))
  settings = validate(dataclasses.replace(defaults, **fields), where)
  source = _resolve(base, entry[source_key])
  try:
    if source_key.endswith("_directory"):
      return read_folder(source, settings, kinds=(kind,))
    return read_jsonl(source, settings, kinds=(kind,))
  except errors.MissingFile as e:
    raise errors.MissingFile(f"{where} ({source_key}): {e}") from None


# ---------------------------------------------------------------------------------------------
# Hugging Face data sets on disk


def _load_hf(dataset_name: str, split: str):
  """The split of a local Hugging Face data set, never downloaded."""
  import datasets  # heavy; only runs that read Hugging Face data pay for it

  if not os.path.exists(dataset_name):
    raise errors.MissingFile(
        f"Hugging Face data set {dataset_name!r} is not a path on this machine; this trainer "
        "reads data sets from disk only. Download it first, e.g. `huggingface-cli download "
        f"--repo-type dataset {dataset_name} --local-dir DIR`, and give DIR")
  saved = any(os.path.isfile(os.path.join(dataset_name, f))
              for f in ("state.json", "dataset_dict.json"))
  if saved:
    loaded = datasets.load_from_disk(dataset_name)
  elif os.path.isdir(dataset_name):
    loaded = datasets.load_dataset(dataset_name)
  else:
    raise errors.ConfigError(f"Hugging Face data set {dataset_name}: give the folder that holds "
                             "its data files (or one written by save_to_disk), not a file")
  if isinstance(loaded, datasets.Dataset):
    return loaded  # save_to_disk of a single split: the split is whatever was saved
  if split not in loaded:
    raise errors.ConfigError(f"Hugging Face data set {dataset_name}: no split {split!r}; it has "
                             f"{', '.join(loaded)}")
  return loaded[split]


def read_hf(dataset_name: str, split: str, image_column: str, caption_column: str,
            defaults: Settings) -> DataSet:
  """A Hugging Face data set on local disk. `image_column` holds images, videos (read undecoded,
  so an Item carries the encoded bytes in `data`) or file paths (relative to the data set's
  folder); the kind comes from the feature type, else the path's extension. An in-memory row's
  Item.path is `dataset_name[split][row]` unless the row names an absolute file."""
  import datasets

  dataset_name = os.path.expanduser(dataset_name)
  ds = _load_hf(dataset_name, split)
  source = f"{dataset_name}[{split}]"
  for column, field in ((image_column, "image_column"), (caption_column, "caption_column")):
    if column not in ds.column_names:
      raise errors.ConfigError(f"Hugging Face data set {source}: no column {column!r} "
                               f"({field}); it has {', '.join(ds.column_names)}")
  feature = ds.features[image_column]
  if isinstance(feature, datasets.Image):
    ds, feature_kind = ds.cast_column(image_column, datasets.Image(decode=False)), "image"
  elif isinstance(feature, datasets.Video):
    ds, feature_kind = ds.cast_column(image_column, datasets.Video(decode=False)), "video"
  elif isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string"):
    feature_kind = None
  else:
    raise errors.ConfigError(f"Hugging Face data set {source}: column {image_column!r} holds "
                             f"{feature}; image_column must hold images, videos or file paths")
  base = dataset_name if os.path.isdir(dataset_name) else os.path.dirname(dataset_name)
  items, problems = [], []
  rows = ds.select_columns([image_column, caption_column])
  for row, (value, caption) in enumerate(zip(rows[image_column], rows[caption_column])):
    name = f"{source}[{row}]"
    data, path = (value.get("bytes"), value.get("path")) if isinstance(value, dict) else (None, value)
    kind = feature_kind or (kind_of(path) if path else None)
    if kind is None:
      problems.append((name if not path else path, _unknown_extension(path or "")))
      continue
    if data is None:
      if not path:
        problems.append((name, "no file and no bytes"))
        continue
      path = _resolve(base, path)
      if not os.path.exists(path):
        problems.append((path, f"file not found (row {row})"))
        continue
    elif not (path and os.path.isabs(path)):
      path = name  # a bare name from the original upload is neither unique nor on disk
    if not isinstance(caption, str):
      problems.append((path, f"no caption (row {row})"))
      caption = None
    items.append(Item(path, caption.strip() if caption is not None else None, kind, data))
  return _finish(source, defaults, items, problems)
