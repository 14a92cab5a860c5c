"""Reading and writing safetensors files with NumPy, bfloat16 included.

The `safetensors` package's NumPy API cannot read bfloat16 tensors, which is what real Wan
checkpoints hold; the format is simple enough (8-byte little-endian header length, a JSON header,
then raw little-endian tensor bytes) to read and write directly. Reads are memory-mapped, so a
sharded 14B checkpoint is only paged in as each tensor is converted.
"""

import json
import os
import struct

import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in _DTYPES.items()}


def load_file(path: str) -> dict[str, np.ndarray]:
  """All tensors of one .safetensors file, as read-only memory-mapped arrays."""
  with open(path, "rb") as f:
    raw = f.read(8)
    if len(raw) != 8:
      raise ValueError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
    (header_len,) = struct.unpack("<Q", raw)
    size = os.fstat(f.fileno()).st_size
    if header_len > size - 8:
      raise ValueError(f"{path}: corrupt safetensors header (length {header_len} > file size)")
    try:
      header = json.loads(f.read(header_len))
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}: corrupt safetensors header: {e}") from None
  data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + header_len)
  tensors = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    if info["dtype"] not in _DTYPES:
      raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
    start, end = info["data_offsets"]
    dtype = _DTYPES[info["dtype"]]
    shape = tuple(info["shape"])
    if end > data.size or end - start != dtype.itemsize * int(np.prod(shape)):
      raise ValueError(f"{path}: tensor {name!r} is truncated or its offsets are corrupt")
    tensors[name] = data[start:end].view(dtype).reshape(shape)
  return tensors


def save_file(tensors: dict[str, np.ndarray], path: str, metadata: dict | None = None):
  """Writes `tensors` to `path` in the safetensors format (C-contiguous, little-endian).

  The file is written under a temporary name and renamed over `path`: readers never see a
  partial file, and arrays memory-mapped from an earlier file at `path` stay valid.
  """
  header, offset, arrays = {}, 0, []
  for name in sorted(tensors):
    a = np.ascontiguousarray(tensors[name])
    if a.dtype not in _NAMES:
      raise ValueError(f"tensor {name!r}: dtype {a.dtype} cannot be written to safetensors")
    header[name] = {"dtype": _NAMES[a.dtype], "shape": list(a.shape),
                    "data_offsets": [offset, offset + a.nbytes]}
    offset += a.nbytes
    arrays.append(a)
  if metadata:
    header["__metadata__"] = {k: str(v) for k, v in metadata.items()}
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)  # keeps tensor data 8-byte aligned
  tmp = f"{path}.tmp-{os.getpid()}"
  try:
    with open(tmp, "wb") as f:
      f.write(struct.pack("<Q", len(blob)))
      f.write(blob)
      for a in arrays:
        f.write(a.tobytes())
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def load_dir(directory: str, stem: str) -> dict[str, np.ndarray]:
  """Tensors of `{stem}.safetensors`, or of the shards listed in `{stem}.safetensors.index.json`."""
  single = os.path.join(directory, f"{stem}.safetensors")
  index = single + ".index.json"
  if os.path.exists(index):
    with open(index) as f:
      weight_map = json.load(f)["weight_map"]
    tensors = {}
    for shard in sorted(set(weight_map.values())):
      shard_path = os.path.join(directory, shard)
      if not os.path.exists(shard_path):
        raise FileNotFoundError(f"{index} lists shard {shard}, which is missing")
      tensors.update(load_file(shard_path))
    missing = sorted(set(weight_map) - set(tensors))
    if missing:
      raise ValueError(f"{index} lists tensors that no shard holds: {missing[:5]}")
    return tensors
  if os.path.exists(single):
    return load_file(single)
  raise FileNotFoundError(f"no {stem}.safetensors or {stem}.safetensors.index.json in {directory}")


def save_dir(tensors: dict[str, np.ndarray], directory: str, stem: str,
             max_shard_bytes: int = 5 * 2**30):
  """Writes `{stem}.safetensors`, or numbered shards plus an index when over `max_shard_bytes`."""
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
    save_file(shards[0], os.path.join(directory, f"{stem}.safetensors"))
    return
  weight_map = {}
  for i, shard in enumerate(shards):
    fname = f"{stem}-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    save_file(shard, os.path.join(directory, fname))
    weight_map.update({name: fname for name in shard})
  total = sum(t.nbytes for t in tensors.values())
  with open(os.path.join(directory, f"{stem}.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
