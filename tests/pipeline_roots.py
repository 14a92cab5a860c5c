"""The tiny diffusers model roots of tests/golden/pipelines/ (tools/golden/pipeline.py), each
assembled from its own folder and the shared components (stored once), by symlinks; and
`tiny_root`, a root around the tiny configs' transformer for training-then-export tests."""

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


def tiny_root(directory, two_experts: bool) -> str:
  """A tiny diffusers root for the tiny configs: their transformer (tests/golden/transformer_t2v,
  twice for A14B) and the pipeline goldens' other components (whose VAE has 4 latent channels,
  not the 16 of the transformer: an export copies it, and diffusers' check stops at latents)."""
  root = os.path.join(str(directory), "root")
  os.makedirs(root)
  parts = {"transformer": os.path.join(GOLDEN_DIR, "transformer_t2v"),
           "text_encoder": os.path.join(PIPELINES, "components", "text_encoder"),
           "tokenizer": os.path.join(PIPELINES, "components", "tokenizer"),
           "vae": os.path.join(PIPELINES, "components", "vae21"),
           "scheduler": os.path.join(PIPELINES, "a14b", "scheduler")}
  if two_experts:
    parts["transformer_2"] = parts["transformer"]
  for name, source in parts.items():
    os.symlink(source, os.path.join(root, name))
  with open(os.path.join(PIPELINES, "a14b", "model_index.json")) as f:
    index = json.load(f)
  if not two_experts:
    del index["transformer_2"], index["boundary_ratio"]
  with open(os.path.join(root, "model_index.json"), "w") as f:
    json.dump(index, f)
  return root
