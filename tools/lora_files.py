"""Trains the tiny LoRAs whose files the diffusers LoRA check loads (project venv).

    .venv/bin/python tools/lora_files.py                       # writes tests/golden/lora/<case>/
    cd /tmp && /tmp/golden-venv/bin/python /work/main/tools/make_golden.py lora   # diffusers side

Each case trains a LoRA for a few steps with our trainer over a tiny diffusers transformer of
tests/golden/ (on synthetic data, a high learning rate so the adapters are far from zero) and
copies the run's last lora/<step>/ directory (the three formats) to tests/golden/lora/<case>/.
tools/golden/lora.py then loads each file with diffusers' own Wan LoRA loader and records the
transformer's output; tests/test_lora.py checks ours with the LoRA merged against it.
"""

import os
import shutil
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# name: (config module, base transformer under tests/golden/, rank, alpha)
CASES = {
    "t2v": ("wan21_t2v", "transformer_t2v", 4, 2.0),
    "i2v": ("wan21_i2v", "transformer_i2v", 4, 1.0),
}


def train_case(name: str, out_dir: str):
  from wan import plan as plan_lib  # pylint: disable=import-outside-toplevel
  from wan import train  # pylint: disable=import-outside-toplevel
  import importlib  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  config, transformer_dir, rank, alpha = CASES[name]
  c = importlib.import_module(f"configs.{config}").get_config("tiny")
  with tempfile.TemporaryDirectory() as tmp:
    c.output_dir = tmp
    c.transformer_pretrained_model_name_or_path = os.path.join(ROOT, "tests", "golden",
                                                               transformer_dir)
    c.enable_lora = True
    c.lora_config.rank = (rank,)
    c.lora_alpha = alpha
    c.learning_rate = 2e-2
    c.max_train_steps = 4
    c.write_metrics = False
    p = plan_lib.make(c, jax.devices())
    train.train(p)
    lora_root = os.path.join(p.outputs.run_dir, "lora")
    last = max(os.listdir(lora_root), key=int)
    target = os.path.join(out_dir, name)
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(os.path.join(lora_root, last), target)
    print(f"{name}: {sorted(os.listdir(target))}")


def main():
  out_dir = os.path.join(ROOT, "tests", "golden", "lora")
  os.makedirs(out_dir, exist_ok=True)
  for name in CASES:
    train_case(name, out_dir)


if __name__ == "__main__":
  main()
