"""Files on local disk or in a cloud bucket (gs://, s3://, ...), through one small interface.

Local paths use the standard library; bucket paths go through TensorFlow's gfile, imported only
when a bucket is used. Paths may be str or os.PathLike.
"""

import os
import shutil
import uuid


def is_remote(path) -> bool:
  return "://" in str(path)


def _gfile():
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  return tf.io.gfile


def absolute(path) -> str:
  """A path made absolute (`~` expanded, relative to the working directory); bucket URLs and ""
  unchanged. Orbax and later processes need absolute paths."""
  path = str(path)
  if not path or is_remote(path):
    return path
  return os.path.abspath(os.path.expanduser(path))


def join(*parts) -> str:
  return "/".join(str(p).rstrip("/") for p in parts) if is_remote(parts[0]) else os.path.join(
      *map(str, parts))


def dirname(path) -> str:
  path = str(path)
  return path.rstrip("/").rsplit("/", 1)[0] if is_remote(path) else os.path.dirname(
      os.path.abspath(path))


def basename(path) -> str:
  path = str(path)
  return path.rstrip("/").rsplit("/", 1)[-1] if is_remote(path) else os.path.basename(
      os.path.abspath(path))


def makedirs(path):
  if is_remote(path):
    _gfile().makedirs(str(path))
  else:
    os.makedirs(path, exist_ok=True)


def exists(path) -> bool:
  return _gfile().exists(str(path)) if is_remote(path) else os.path.exists(path)


def isdir(path) -> bool:
  return _gfile().isdir(str(path)) if is_remote(path) else os.path.isdir(path)


def listdir(path) -> list[str]:
  """Names (not paths) of the entries of a directory, sorted; no trailing "/" on folders."""
  if is_remote(path):
    return sorted(name.rstrip("/") for name in _gfile().listdir(str(path)))
  return sorted(os.listdir(path))


def size(path) -> int:
  """Size of a file in bytes."""
  return _gfile().stat(str(path)).length if is_remote(path) else os.path.getsize(path)


def file_sizes(path) -> dict[str, int]:
  """{path relative to directory `path` ("/"-separated): size in bytes} of every file under it."""
  path = str(path).rstrip("/")
  walk = _gfile().walk(path) if is_remote(path) else os.walk(path)
  sizes = {}
  for root, _, names in walk:
    rel = str(root)[len(path):].strip("/")
    for name in names:
      sizes[f"{rel}/{name}" if rel else name] = size(join(str(root), name))
  return sizes


def open_file(path, mode: str = "r"):
  return _gfile().GFile(str(path), mode) if is_remote(path) else open(path, mode)


def read_bytes(path, offset: int = 0, length: int | None = None) -> bytes:
  """`length` bytes from `offset` (to the end of the file when None); a ranged read in a bucket."""
  with open_file(path, "rb") as f:
    if offset:
      f.seek(offset)
    return f.read() if length is None else f.read(length)


def replace(src, dst):
  """Renames file `src` over `dst` (atomic on local disk: readers see the old or the new file)."""
  if is_remote(src):
    _gfile().rename(str(src), str(dst), overwrite=True)
  else:
    os.replace(src, dst)


def rename(src, dst):
  """Renames a file or directory to a name that does not exist yet.

  A bucket has no directories, only names with slashes: a "directory" is renamed object by
  object (not atomically, unlike a local rename).
  """
  if not is_remote(src):
    os.rename(src, dst)
  elif isdir(src):
    makedirs(dst)
    for name in listdir(src):
      rename(join(src, name), join(dst, name))
    rmtree(src)
  else:
    _gfile().rename(str(src), str(dst))


def remove(path):
  if is_remote(path):
    _gfile().remove(str(path))
  else:
    os.remove(path)


def rmtree(path):
  """Removes a directory and everything in it; nothing happens if it does not exist."""
  if is_remote(path):
    if _gfile().exists(str(path)):
      _gfile().rmtree(str(path))
  else:
    shutil.rmtree(path, ignore_errors=True)


def sibling(path, tag: str) -> str:
  """A new, unused name next to `path` (hidden, with `tag`), for writing before renaming."""
  return join(dirname(path), f".{basename(path)}.{tag}-{uuid.uuid4().hex[:12]}")


def write_dir(path, fill):
  """Writes directory `path` as a whole: `fill(tmp)` writes it under a temporary name next to
  `path`, which is then renamed into place. An interrupted write leaves an earlier directory at
  `path` intact and no temporary directory behind."""
  path = str(path).rstrip("/")
  makedirs(dirname(path))
  tmp = sibling(path, "tmp")
  try:
    makedirs(tmp)
    fill(tmp)
    _swap_in(tmp, path)
  except BaseException:
    rmtree(tmp)
    raise


def _swap_in(new: str, path: str):
  """Renames directory `new` to `path`, replacing (and then deleting) an earlier one there."""
  if not exists(path):
    rename(new, path)
    return
  old = sibling(path, "old")
  rename(path, old)
  try:
    rename(new, path)
  except BaseException:
    rename(old, path)
    raise
  rmtree(old)


def copy(src, dst):
  """Copies file or directory `src` (following links) to a new `dst`, locally or in buckets."""
  if not is_remote(src) and not is_remote(dst):
    if os.path.isdir(src):
      shutil.copytree(src, dst)
    else:
      shutil.copyfile(src, dst)
    return
  if not isdir(src):
    with open_file(src, "rb") as fin, open_file(dst, "wb") as fout:
      shutil.copyfileobj(fin, fout)
    return
  makedirs(dst)
  for name in listdir(src):
    copy(join(src, name), join(dst, name))
