"""Two local processes (2 CPU devices each) train as one 4-device job, like a 2-host cluster:
jax.distributed, per-host weight loading and data, coordinated checkpoints; same losses as one
4-device process."""

import json
import os
import socket
import subprocess
import sys

import jax

from configs import wan21_t2v
from tests import xla_env
from wan import plan, train, transformer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETTINGS = dict(max_train_steps=3, global_batch_size=4, checkpoint_every=12, precision="HIGHEST")
FLAGS = ["--config=configs/wan21_t2v.py:tiny"] + [f"--config.{k}={v}" for k, v in SETTINGS.items()]


def _start(out, devices, *extra):
  env = xla_env.env(devices)
  return subprocess.Popen([sys.executable, "launch.py", *FLAGS, f"--config.output_dir={out}",
                           *extra], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def _losses(out):
  with open(os.path.join(out, "wan21_t2v_tiny", "metrics.jsonl")) as f:
    return [json.loads(line)["loss"] for line in f]


def test_two_processes_match_one(tmp_path):
  """Both start from one saved checkpoint, which each process reads only its devices' parts of
  (transformer.load with a mesh)."""
  weights = str(tmp_path / "weights")
  model = plan.make(wan21_t2v.get_config("tiny"), jax.devices()[:1]).model
  transformer.save(weights, model, transformer.init(model, jax.random.key(5)))
  settings = dict(SETTINGS, transformer_pretrained_model_name_or_path=weights)
  flags = [f"--config.{k}={v}" for k, v in settings.items()]
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  multi = str(tmp_path / "multi")
  procs = [_start(multi, 2, f"--config.coordinator_address=localhost:{port}",
                  "--config.num_processes=2", f"--config.process_id={i}", *flags)
           for i in range(2)]
  # The same run in this process on 4 of its devices, while the two processes work.
  c = wan21_t2v.get_config("tiny")
  c.update(dict(settings, output_dir=str(tmp_path / "single")))
  want = train.train(plan.make(c, jax.devices()[:4]), jax.devices()[:4])
  for p in procs:
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 0, out[-3000:]
  got = _losses(multi)
  assert len(got) == 3
  for a, b in zip(got, want):
    assert abs(a - b) <= 1e-5 * abs(b), (got, want)
  assert os.listdir(os.path.join(multi, "wan21_t2v_tiny", "checkpoints")) == ["3"]
  # Both processes resume from the checkpoint; process 0 alone says so.
  procs = [_start(multi, 2, f"--config.coordinator_address=localhost:{port + 1}",
                  "--config.num_processes=2", f"--config.process_id={i}", *flags)
           for i in range(2)]
  outputs = [p.communicate(timeout=300)[0] for p in procs]
  assert all(p.returncode == 0 for p in procs), outputs
  assert "".join(outputs).count("resumed from step 3") == 1, outputs
