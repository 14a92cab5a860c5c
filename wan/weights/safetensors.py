"""The one safetensors reader and writer: NumPy arrays, bfloat16 included, local or bucket paths.

The `safetensors` package's NumPy API cannot read bfloat16, which is what real Wan checkpoints
hold; the format is simple enough to read and write directly: an 8-byte little-endian header
length, a JSON header {name: {dtype, shape, data_offsets}} (plus "__metadata__"), then the raw
little-endian tensor bytes. Local files are memory-mapped, so a sharded 14B checkpoint is only
paged in as each tensor is converted; a bucket file's header comes from a ranged read and its
tensors from one read of the data.

A checkpoint directory holds `{stem}.safetensors`, or the shards that
`{stem}.safetensors.index.json` lists; with neither, every `*.safetensors` in it (a tensor name in
two files is an error, since which one a model means is unknown).
"""

import dataclasses
import json
import struct

import ml_dtypes
import numpy as np

from wan import fs
from wan.errors import CheckpointError, MissingFile
from wan.weights import roots

DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in DTYPES.items()}
SUFFIX = ".safetensors"
INDEX_SUFFIX = ".safetensors.index.json"


@dataclasses.dataclass(frozen=True)
class TensorInfo:
  """One tensor as the header describes it; `start`/`end` are byte offsets into the data."""
  dtype: np.dtype
  shape: tuple[int, ...]
  start: int
  end: int


# ----------------------------------------------------------------------------------------------
# One file


def _parse_header(path: str, blob: bytes, data_size: int) -> dict[str, TensorInfo]:
  try:
    header = json.loads(blob)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise CheckpointError(f"{path}: corrupt safetensors header: {e}") from None
  if not isinstance(header, dict):
    raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
  infos = {}
  for name, entry in header.items():
    if name == "__metadata__":
      continue
    try:
      dtype_name, shape, (start, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
    except (KeyError, TypeError, ValueError):
      raise CheckpointError(f"{path}: corrupt safetensors header entry for {name!r}: "
                            f"{entry!r}") from None
    if dtype_name not in DTYPES:
      raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {dtype_name} "
                            f"(readable: {', '.join(DTYPES)})")
    dtype = DTYPES[dtype_name]
    if end > data_size or end - start != dtype.itemsize * int(np.prod(shape)):
      raise CheckpointError(f"{path}: tensor {name!r} is truncated or its offsets are corrupt")
    infos[name] = TensorInfo(dtype, shape, start, end)
  return infos


def _read_header_bytes(path: str) -> tuple[bytes, int, int]:
  """(header JSON bytes, offset of the tensor data, size of the tensor data) of one file."""
  raw = fs.read_bytes(path, 0, 8)
  if len(raw) != 8:
    raise CheckpointError(f"{path}: not a safetensors file (shorter than its 8-byte header "
                          "length), truncated")
  (header_len,) = struct.unpack("<Q", raw)
  size = fs.size(path)
  if header_len > size - 8:
    raise CheckpointError(f"{path}: corrupt or truncated safetensors header (length "
                          f"{header_len} > file size {size})")
  return fs.read_bytes(path, 8, header_len), 8 + header_len, size - 8 - header_len


def read_header(path) -> dict[str, TensorInfo]:
  """Names, dtypes and shapes of the tensors of one file, reading no tensor data."""
  path = str(path)
  blob, _, data_size = _read_header_bytes(path)
  return _parse_header(path, blob, data_size)


def read_metadata(path) -> dict[str, str]:
  """The `__metadata__` strings of one file's header ({} when it has none)."""
  path = str(path)
  blob, _, data_size = _read_header_bytes(path)
  _parse_header(path, blob, data_size)  # a corrupt header is reported as such
  metadata = json.loads(blob).get("__metadata__") or {}
  return {str(k): str(v) for k, v in metadata.items()} if isinstance(metadata, dict) else {}


class Ranged:
  """One tensor of a bucket file, read (one ranged read) only when converted to an array."""

  def __init__(self, path: str, offset: int, info: TensorInfo):
    self._path, self._offset, self._info = path, offset, info
    self.shape, self.dtype = info.shape, info.dtype

  def __array__(self, dtype=None, copy=None):
    del copy  # every read is a new array
    i = self._info
    data = fs.read_bytes(self._path, self._offset + i.start, i.end - i.start)
    a = np.frombuffer(data, i.dtype).reshape(i.shape)
    return a if dtype is None else a.astype(dtype)


def read_file(path, lazy: bool = False) -> dict[str, np.ndarray]:
  """All tensors of one .safetensors file: read-only memory-mapped arrays for a local file.
  A bucket file is read whole, or with `lazy` each tensor when it is used (`Ranged`): what a
  host that needs only some of a big checkpoint reads."""
  path = str(path)
  blob, offset, data_size = _read_header_bytes(path)
  infos = _parse_header(path, blob, data_size)
  if fs.is_remote(path) and lazy:
    return {name: Ranged(path, offset, i) for name, i in infos.items()}
  if fs.is_remote(path):
    data = np.frombuffer(fs.read_bytes(path, offset), np.uint8)
  elif data_size:
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=offset)
  else:  # a file of empty tensors: mmap cannot map zero bytes
    data = np.zeros((0,), np.uint8)
  return {name: data[i.start:i.end].view(i.dtype).reshape(i.shape) for name, i in infos.items()}


def write_file(path, tensors: dict[str, np.ndarray], metadata: dict | None = None):
  """Writes `tensors` to `path` (C-contiguous, little-endian, names sorted, 8-byte aligned).

  The file is written under a temporary name and renamed over `path`: readers never see a
  partial file, and arrays memory-mapped from an earlier file at `path` stay valid.
  """
  path = str(path)
  header, offset, arrays = {}, 0, []
  for name in sorted(tensors):
    a = np.ascontiguousarray(tensors[name])
    if a.dtype not in _NAMES:
      raise CheckpointError(f"{path}: tensor {name!r} of dtype {a.dtype} cannot be written to "
                            "safetensors")
    header[name] = {"dtype": _NAMES[a.dtype], "shape": list(a.shape),
                    "data_offsets": [offset, offset + a.nbytes]}
    offset += a.nbytes
    arrays.append(a)
  if metadata:
    header["__metadata__"] = {k: str(v) for k, v in metadata.items()}
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)  # keeps tensor data 8-byte aligned
  tmp = fs.sibling(path, "tmp")
  try:
    with fs.open_file(tmp, "wb") as f:
      f.write(struct.pack("<Q", len(blob)))
      f.write(blob)
      for a in arrays:
        f.write(a.tobytes())
    fs.replace(tmp, path)
  finally:
    if fs.exists(tmp):
      fs.remove(tmp)


# ----------------------------------------------------------------------------------------------
# A directory


def _listing(directory: str, stem: str | None) -> tuple[list[str], str | None, dict | None]:
  """(files holding the checkpoint, its index file, the index's weight map) of `directory`."""
  if stem is not None:
    index = fs.join(directory, stem + INDEX_SUFFIX)
    if fs.exists(index):
      weight_map = roots.read_json(index).get("weight_map")
      if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index}: no weight_map object (tensor name -> shard file)")
      paths = [fs.join(directory, shard) for shard in sorted(set(weight_map.values()))]
      for path in paths:
        if not fs.exists(path):
          raise MissingFile(f"{index} lists shard {fs.basename(path)}, which is missing")
      return paths, index, weight_map
    if fs.exists(fs.join(directory, stem + SUFFIX)):
      return [fs.join(directory, stem + SUFFIX)], None, None
  if not fs.isdir(directory):
    raise MissingFile(f"checkpoint directory {directory} does not exist")
  paths = [fs.join(directory, n) for n in fs.listdir(directory) if n.endswith(SUFFIX)]
  if not paths:
    named = f"{stem}{SUFFIX}, no {stem}{INDEX_SUFFIX} and no other " if stem else ""
    raise MissingFile(f"{directory} holds no {named}*{SUFFIX} weights")
  return paths, None, None


def _merge(directory: str, stem: str | None, read_one) -> dict:
  """{name: read_one(file)[name]} over the checkpoint's files; a name in two files is an error."""
  paths, index, weight_map = _listing(directory, stem)
  merged, source = {}, {}
  for path in paths:
    for name, value in read_one(path).items():
      if name in merged:
        raise CheckpointError(f"tensor {name!r} is in both {source[name]} and {path}; keep one "
                              "of the files in the directory")
      merged[name], source[name] = value, path
  missing = sorted(set(weight_map or ()) - set(merged))
  if missing:
    raise CheckpointError(f"{index} lists tensors that no shard holds: {missing[:5]}")
  return merged


def read_dir(directory, stem: str | None = None, lazy: bool = False) -> dict[str, np.ndarray]:
  """All tensors of a checkpoint directory (memory-mapped where local; `lazy`: see read_file)."""
  return _merge(str(directory), stem, lambda path: read_file(path, lazy))


def read_dir_header(directory, stem: str | None = None) -> dict[str, TensorInfo]:
  """Names, dtypes and shapes of every tensor of a checkpoint directory; no tensor data read."""
  return _merge(str(directory), stem, read_header)


def write_dir(directory, tensors: dict[str, np.ndarray], stem: str,
              max_shard_bytes: int = 5 * 2**30):
  """Writes `{stem}.safetensors`, or numbered shards plus an index when over `max_shard_bytes`."""
  directory = str(directory)
  shards, current, size = [], {}, 0
  for name in sorted(tensors):
    nbytes = tensors[name].nbytes
    if current and size + nbytes > max_shard_bytes:
      shards.append(current)
      current, size = {}, 0
    current[name] = tensors[name]
    size += nbytes
  shards.append(current)
  if len(shards) == 1:
    write_file(fs.join(directory, stem + SUFFIX), shards[0])
    return
  weight_map = {}
  for i, shard in enumerate(shards):
    name = f"{stem}-{i + 1:05d}-of-{len(shards):05d}{SUFFIX}"
    write_file(fs.join(directory, name), shard)
    weight_map.update({tensor: name for tensor in shard})
  total = sum(t.nbytes for t in tensors.values())
  index = {"metadata": {"total_size": total}, "weight_map": weight_map}
  with fs.open_file(fs.join(directory, stem + INDEX_SUFFIX), "w") as f:
    json.dump(index, f, indent=2)
