"""The tiny diffusers model roots of tests/golden/pipelines/ (tools/golden/pipeline.py), each
assembled from its own folder and the shared components (stored once), by symlinks."""

import json
import os

from tests.conftest import GOLDEN_DIR

PIPELINES = os.path.join(GOLDEN_DIR, "pipelines")


def cases() -> dict:
  with open(os.path.join(PIPELINES, "cases.json")) as f:
    return json.load(f)


def assemble(name: str, directory) -> str:
  """A model root `name` (t2v, a14b, i2v, ti2v) under `directory`; returns its path."""
  own = os.path.join(PIPELINES, name)
  root = os.path.join(str(directory), name)
  if os.path.isdir(root):
    return root
  os.makedirs(root)
  for entry in os.listdir(own):
    if entry not in ("parts.json", "golden.npz"):
      os.symlink(os.path.join(own, entry), os.path.join(root, entry))
  with open(os.path.join(own, "parts.json")) as f:
    for folder, stored in json.load(f).items():
      os.symlink(os.path.join(PIPELINES, "components", stored), os.path.join(root, folder))
  return root
