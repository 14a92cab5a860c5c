"""Where a model's components live, and the JSON files they hold.

A path may name a component directory itself (it holds the component's marker file: config.json
for a model, tokenizer.json or spiece.model for a tokenizer) or a model root holding the
component's subfolder, as diffusers lays them out (transformer/, vae/, text_encoder/, ...). The
Wan 2.2 A14B experts are transformer/ (high noise) and transformer_2/ (low noise) in a diffusers
root, high_noise_model/ and low_noise_model/ in an original Wan-AI root.

Every JSON file of the weights layer is read through `read_json`, so that a broken one is an
error naming the file rather than a bare JSONDecodeError.
"""

import hashlib
import json

from wan import fs
from wan.errors import CheckpointError, ConfigError, MissingFile

EXPERTS = ("high_noise", "low_noise")
MARKERS = {
    "transformer": ("config.json",),
    "vae": ("config.json",),
    "text_encoder": ("config.json",),
    "tokenizer": ("tokenizer.json", "spiece.model"),
    "image_encoder": ("config.json",),
    "image_processor": ("preprocessor_config.json",),
}
_TRANSFORMER_FOLDERS = {"high_noise": ("transformer", "high_noise_model"),
                        "low_noise": ("transformer_2", "low_noise_model")}


def subfolders(component: str, expert: str = "high_noise") -> tuple[str, ...]:
  """The subfolders of a model root that may hold `component` (in the order they are tried)."""
  if component not in MARKERS:
    raise ValueError(f"component {component!r} is not one of {sorted(MARKERS)}")
  if expert not in EXPERTS:
    raise ConfigError(f"expert={expert!r} is not one of {list(EXPERTS)}")
  return _TRANSFORMER_FOLDERS[expert] if component == "transformer" else (component,)


def _holds(directory: str, component: str) -> bool:
  return any(fs.exists(fs.join(directory, m)) for m in MARKERS[component])


def find(path, component: str, expert: str = "high_noise") -> str | None:
  """The directory of `component` at `path` (itself or a subfolder), or None if there is none.

  A path that is itself a transformer directory is used as given for either expert.
  """
  path = str(path)
  folders = subfolders(component, expert)
  if _holds(path, component):
    return path
  for folder in folders:
    candidate = fs.join(path, folder)
    if _holds(candidate, component):
      return candidate
  return None


def resolve(path, component: str, expert: str = "high_noise") -> str:
  """As `find`, but a path without the component is a `MissingFile` saying what was expected."""
  path = str(path)
  found = find(path, component, expert)
  if found is not None:
    return found
  if not fs.isdir(path):
    raise MissingFile(f"{component} checkpoint directory {path} does not exist")
  markers = MARKERS[component]
  holds = (f"no {markers[0]}" if len(markers) == 1 else
           "neither " + " nor ".join(markers))
  folders = " or ".join(f"{f}/" for f in subfolders(component, expert))
  what = f" for expert {expert!r}" if component == "transformer" else ""
  raise MissingFile(f"{path} holds no {component}{what}: it holds {holds}, nor a {folders} "
                    "subfolder with one")


def read_json(path) -> dict:
  """A JSON file's object; a missing file is `MissingFile`, a broken one `CheckpointError`."""
  path = str(path)
  if not fs.exists(path):
    raise MissingFile(f"{path} does not exist")
  with fs.open_file(path, "r") as f:
    text = f.read()
  try:
    value = json.loads(text)
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{path} is not valid JSON: {e}") from None
  if not isinstance(value, dict):
    raise CheckpointError(f"{path} holds a JSON {type(value).__name__}, expected an object")
  return value


def model_index(root) -> dict | None:
  """A diffusers root's model_index.json (component name -> [library, class]), None if absent."""
  path = fs.join(root, "model_index.json")
  return read_json(path) if fs.exists(path) else None


def fingerprint(directory) -> str:
  """A short identity of the weights in a component directory: a hash of every file's name,
  size, first and last 64 KiB. Reading that much is instant even for an 11 GB text encoder, yet
  any re-save, fine-tune or other model changes it (safetensors headers hold every tensor's
  offsets, and data follows them)."""
  digest = hashlib.sha256()
  for name in sorted(fs.listdir(directory)):
    path = fs.join(directory, name)
    if fs.isdir(path):
      continue
    size = fs.size(path)
    digest.update(f"{name}:{size}:".encode())
    digest.update(fs.read_bytes(path, 0, min(size, 65536)))
    digest.update(fs.read_bytes(path, max(0, size - 65536), min(size, 65536)))
  return digest.hexdigest()[:16]
