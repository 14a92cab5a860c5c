"""The sample cache: shards of encoded samples plus one manifest.

  {cache}/manifest.json            what made the cache and what it holds (see `manifest`)
  {cache}/{bucket}-p{P}-{N}.tfrecord    (or .arrayrecord for dataset_type=grain)
  {cache}/progress-p{P}.jsonl      shards finished by process P (a killed job resumes from it)

Each record is a `tf.train.Example` with the sample's arrays as raw float32 bytes plus their
shapes (`latents`, `text`, and `cond` / `image` where the family needs them), its key and
caption. A shard holds samples of one bucket. Shards are written under a temporary name and
renamed when complete, so a killed job never leaves a shard that looks whole. The manifest keeps
each record's offset, length and CRC-32, so records are read at random (exactly resumable
shuffling, per-host reads) and a damaged file is named, not misread.
"""

import json
import os
import zlib

import numpy as np

from wan import fs
from wan.errors import CheckpointError, ConfigError, MissingFile

FORMAT = "wan-cache/1"
EXTENSIONS = {"tfrecord": ".tfrecord", "arrayrecord": ".arrayrecord"}
ARRAYS = ("latents", "text", "cond", "image")
MANIFEST = "manifest.json"


def _example_pb2():
  from tensorflow.core.example import example_pb2  # pylint: disable=import-outside-toplevel
  return example_pb2


def to_bytes(key: str, caption: str, sample: dict) -> bytes:
  """One sample (wan/data/encode.py's dict) as a serialised tf.train.Example."""
  example = _example_pb2().Example()
  feature = example.features.feature
  feature["key"].bytes_list.value.append(key.encode())
  feature["caption"].bytes_list.value.append(caption.encode())
  for name in ARRAYS:
    if name in sample:
      a = np.ascontiguousarray(sample[name], np.float32)
      feature[name].bytes_list.value.append(a.tobytes())
      feature[name + "_shape"].int64_list.value.extend(a.shape)
  return example.SerializeToString()


def from_bytes(data: bytes) -> dict:
  """The arrays of a serialised record (plus "key" and "caption")."""
  example = _example_pb2().Example.FromString(data)
  feature = example.features.feature
  out = {"key": feature["key"].bytes_list.value[0].decode(),
         "caption": feature["caption"].bytes_list.value[0].decode()}
  for name in ARRAYS:
    if name in feature:
      shape = tuple(feature[name + "_shape"].int64_list.value)
      out[name] = np.frombuffer(feature[name].bytes_list.value[0], np.float32).reshape(shape)
  return out


def bucket_name(latent_shape) -> str:
  f, h, w, _ = latent_shape
  return f"{f}x{h}x{w}"


class ShardWriter:
  """Writes one shard under a temporary name; `close()` renames it into place and returns its
  manifest entry. The TFRecord framing is written here (length, masked CRC-32C of length and of
  data, as TensorFlow reads it) so that each record's offset is known."""

  def __init__(self, path: str, record_format: str):
    self.path, self._format = path, record_format
    self._tmp = path + ".tmp"
    self._records = []
    if record_format == "arrayrecord":
      from array_record.python import array_record_module  # pylint: disable=import-outside-toplevel
      self._writer = array_record_module.ArrayRecordWriter(self._tmp, "group_size:1")
    else:
      import tensorflow as tf  # pylint: disable=import-outside-toplevel
      self._writer = tf.io.TFRecordWriter(self._tmp)
    self._offset = 0

  def write(self, data: bytes, key: str, bucket: str, repeats: int, text_length: int):
    self._writer.write(data)
    entry = {"key": key, "bucket": bucket, "repeats": repeats, "text_length": text_length,
             "length": len(data), "crc": zlib.crc32(data)}
    if self._format == "tfrecord":
      entry["offset"] = self._offset + 12  # after the length and its CRC
      self._offset += len(data) + 16
    else:
      entry["index"] = len(self._records)
    self._records.append(entry)

  def __len__(self) -> int:
    """Records written so far."""
    return len(self._records)

  def close(self) -> dict:
    self._writer.close()
    fs.replace(self._tmp, self.path)
    return {"file": os.path.basename(self.path), "records": self._records}


class Reader:
  """Random access to the records of a cache."""

  def __init__(self, cache: str, manifest: dict):
    self._cache, self._format = cache, manifest["record_format"]
    self._readers = {}

  def read(self, file: str, entry: dict) -> dict:
    path = fs.join(self._cache, file)
    if self._format == "tfrecord":
      data = fs.read_bytes(path, entry["offset"], entry["length"])
    else:
      if file not in self._readers:
        from grain import python as grain  # pylint: disable=import-outside-toplevel
        self._readers[file] = grain.ArrayRecordDataSource([path])
      data = self._readers[file][entry["index"]]
    if len(data) != entry["length"] or zlib.crc32(data) != entry["crc"]:
      raise CheckpointError(f"{path}: record {entry['key']} is damaged (its length or CRC "
                            "does not match the manifest); run job=prepare again")
    return from_bytes(data)


# ----------------------------------------------------------------------------------------------
# Manifest.


def read_manifest(cache: str) -> dict:
  path = fs.join(cache, MANIFEST)
  if not fs.exists(path):
    raise MissingFile(f"{cache} holds no {MANIFEST}: it is not a finished cache; make one with "
                      "--config.job=prepare --config.tfrecords_dir=... (docs/data.md)")
  try:
    with fs.open_file(path, "r") as f:
      manifest = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise CheckpointError(f"{path} is damaged ({e}); run job=prepare again") from None
  if manifest.get("format") != FORMAT:
    raise CheckpointError(f"{path} is not a cache of this trainer (format "
                          f"{manifest.get('format')!r}, expected {FORMAT!r})")
  for shard in manifest["shards"]:
    if not fs.exists(fs.join(cache, shard["file"])):
      raise CheckpointError(f"{cache}: shard {shard['file']} of the manifest is missing; "
                            "run job=prepare again")
  return manifest


def write_json(path: str, value):
  tmp = fs.sibling(path, "tmp")
  with fs.open_file(tmp, "w") as f:
    json.dump(value, f, indent=1)
  fs.replace(tmp, path)


def bucket_counts(manifest: dict) -> dict:
  """{latent shape: samples per epoch (with repeats)} of a manifest."""
  return {tuple(b["latent_shape"]): b["samples"] for b in manifest["buckets"].values()}


def check_writable(cache: str, identity: dict):
  """A cache directory may be written when it is new, or holds a cache of the same encoders
  (finished: nothing to do; unfinished: resumed). Anything else is refused, never overwritten."""
  if not fs.exists(cache):
    return
  if not fs.isdir(cache):
    raise ConfigError(f"{cache} is a file; the cache needs a directory")
  if fs.exists(fs.join(cache, MANIFEST)):
    made = read_manifest(cache)["identity"]
  else:
    parts = [n for n in fs.listdir(cache) if n.startswith("progress-p")]
    if not parts:
      if [n for n in fs.listdir(cache) if n != "eval"]:
        raise ConfigError(f"{cache} is not empty and holds no cache of this trainer; choose "
                          "an empty or new directory")
      return
    with fs.open_file(fs.join(cache, parts[0]), "r") as f:
      made = json.loads(f.readline())["identity"]
  if made != identity:
    diff = sorted(k for k in identity if made.get(k) != identity[k])
    raise ConfigError(f"{cache} holds a cache made by other encoders ({', '.join(diff)} "
                      f"differ: {[made.get(k) for k in diff]} vs {[identity[k] for k in diff]});"
                      " choose another directory, or delete it to prepare again")


def shard_name(bucket: str, process: int, number: int, record_format: str) -> str:
  return f"{bucket}-p{process:03d}-{number:05d}{EXTENSIONS[record_format]}"

