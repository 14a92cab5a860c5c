"""Files on local disk or in a cloud bucket (gs://, s3://, ...), through one small interface.

Local paths use the standard library; bucket paths go through TensorFlow's gfile, imported only
when a bucket is used.
"""

import os


def is_remote(path: str) -> bool:
  return "://" in str(path)


def _gfile():
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  return tf.io.gfile


def join(*parts) -> str:
  return "/".join(str(p).rstrip("/") for p in parts) if is_remote(parts[0]) else os.path.join(
      *map(str, parts))


def makedirs(path: str):
  if is_remote(path):
    _gfile().makedirs(path)
  else:
    os.makedirs(path, exist_ok=True)


def exists(path: str) -> bool:
  return _gfile().exists(path) if is_remote(path) else os.path.exists(path)


def open_file(path: str, mode: str = "r"):
  return _gfile().GFile(path, mode) if is_remote(path) else open(path, mode)
