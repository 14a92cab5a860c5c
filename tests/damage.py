"""Checkpoint damage for the fault tests: files cut short as a crash or a full disk leaves them."""

import os


def truncate(directory) -> int:
  """Cuts every file over 64 bytes under `directory` to half its size; returns how many."""
  cut = 0
  for root, _, names in os.walk(directory):
    for name in names:
      path = os.path.join(root, name)
      if os.path.getsize(path) > 64:
        os.truncate(path, os.path.getsize(path) // 2)
        cut += 1
  return cut
