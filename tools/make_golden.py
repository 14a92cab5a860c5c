"""Writes the golden files under tests/golden/ from the independent PyTorch references.

Runs in a separate venv that has torch, diffusers and transformers; none of them is a project
dependency, and nothing here imports `wan/`:

    python3 -m venv /tmp/golden-venv
    /tmp/golden-venv/bin/pip install torch==2.13.0 diffusers transformers safetensors \
        sentencepiece accelerate protobuf
    /tmp/golden-venv/bin/python tools/make_golden.py            # every component
    /tmp/golden-venv/bin/python tools/make_golden.py vae text    # some of them

Each component lives in tools/golden/<name>.py and exposes `make(out_dir)`. Inputs are drawn
from fixed seeds so that the files are reproducible; each file stores inputs, reference outputs
and, where a checkpoint is involved, the tiny checkpoint itself.
"""

import importlib
import os
import sys

COMPONENTS = ("transformer", "vae", "text", "image", "samplers", "pipeline", "lora")
OUT_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests",
                       "golden")


def main(argv):
  names = argv[1:] or COMPONENTS
  unknown = sorted(set(names) - set(COMPONENTS))
  if unknown:
    sys.exit(f"unknown component(s) {unknown}; choose from {COMPONENTS}")
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  os.makedirs(OUT_DIR, exist_ok=True)
  for name in names:
    print(f"== {name}", flush=True)
    importlib.import_module(f"golden.{name}").make(OUT_DIR)


if __name__ == "__main__":
  main(sys.argv)
