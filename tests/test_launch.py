"""The README's main command, end to end in a subprocess: console, metrics, checkpoints."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _launch(tmp_path, *flags):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
  return subprocess.run(
      [sys.executable, os.path.join(ROOT, "launch.py"), "--config=configs/wan21_t2v.py:tiny",
       f"--config.output_dir={tmp_path}", f"--config.jax_cache_dir={tmp_path / 'jax_cache'}", *flags],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_tiny_run_writes_logs_metrics_and_checkpoints(tmp_path):
  r = _launch(tmp_path, "--config.max_train_steps=4", "--config.checkpoint_every=4",
              "--config.enable_profiler=True", "--config.skip_first_n_steps_for_profiler=1",
              "--config.profiler_steps=2", "--config.enable_jax_named_scopes=True")
  assert r.returncode == 0, r.stderr[-3000:]
  lines = [l for l in r.stdout.splitlines() if l.startswith("step ")]
  assert len(lines) == 4 and "loss" in lines[-1] and "ETA" in lines[-1]
  run_dir = tmp_path / "wan21_t2v_tiny"
  records = [json.loads(l) for l in open(run_dir / "metrics.jsonl")]
  assert [r["step"] for r in records] == [1, 2, 3, 4]
  assert {"loss", "learning_rate", "step_time", "tflops_per_device", "grad_norm"} <= set(records[0])
  assert sorted(os.listdir(run_dir / "checkpoints")) == ["2", "4"]
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(run_dir / "tensorboard"))
  assert os.listdir(tmp_path / "jax_cache")  # the compiled step, for the next run
  traces = [f for _, _, files in os.walk(run_dir / "profile") for f in files]
  assert any(f.endswith(".xplane.pb") for f in traces), traces


def test_bad_override_fails_before_any_work(tmp_path):
  r = _launch(tmp_path, "--config.num_frames=8")
  assert r.returncode != 0
  assert "num_frames=8 must be 4k+1" in r.stderr
  assert not (tmp_path / "wan21_t2v_tiny").exists()
