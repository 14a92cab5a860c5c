"""The files of a T5/UMT5 tokenizer: tokenizer.json or spiece.model, and tokenizer_config.json.

Read here (through wan/fs.py, so a bucket works) and handed to wan/tokenizer.py as bytes.
"""

import dataclasses

from wan import fs
from wan.errors import CheckpointError
from wan.weights import roots


@dataclasses.dataclass(frozen=True)
class Files:
  """path: the file read; kind: "tokenizer.json" (the `tokenizers` format) or "spiece.model"
  (a sentencepiece proto); data: its bytes; extra_ids: tokenizer_config.json's sentinel count,
  None when it has none."""
  path: str
  kind: str
  data: bytes
  extra_ids: int | None


def read(path) -> Files:
  """The tokenizer at `path`: either file itself, a directory holding one (tokenizer.json is
  preferred, as transformers does) or a model root with tokenizer/."""
  path = str(path)
  if fs.isdir(path) or not fs.exists(path):
    directory = roots.resolve(path, "tokenizer")
    file = next(fs.join(directory, n) for n in roots.MARKERS["tokenizer"]
                if fs.exists(fs.join(directory, n)))
  else:
    directory, file = fs.dirname(path), path
  if file.endswith(".json"):
    kind = "tokenizer.json"
  elif file.endswith(".model"):
    kind = "spiece.model"
  else:
    raise CheckpointError(f"{file}: expected a tokenizer.json or a sentencepiece .model file")
  config_path = fs.join(directory, "tokenizer_config.json")
  extra_ids = roots.read_json(config_path).get("extra_ids") if fs.exists(config_path) else None
  return Files(file, kind, fs.read_bytes(file), extra_ids)
