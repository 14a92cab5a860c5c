"""The launcher end to end in subprocesses: the README's main command as written, console,
metrics, checkpoints, resume; config errors as one clear line before any work."""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from tests import xla_env

import launch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _launch(tmp_path, *flags, config="configs/wan21_t2v.py:tiny"):
  args = [f"--config={config}"] if config else []
  return subprocess.run(
      [sys.executable, os.path.join(ROOT, "launch.py"), *args,
       f"--config.output_dir={tmp_path}", f"--config.jax_cache_dir={tmp_path / 'jax_cache'}",
       *flags], cwd=ROOT, env=xla_env.env(2), capture_output=True, text=True, timeout=300)


def _readme_main_command() -> str:
  """The part after the last '&&' of the README's first launch.py line, as CI runs it."""
  with open(os.path.join(ROOT, "README.md")) as f:
    line = next(l for l in f if re.match(r"^\s+.*launch\.py", l))
  return line.split("&&")[-1].strip()


def _scratch_copy(tmp_path):
  """What a fresh clone has: the files git tracks or would add (without outputs or the venv);
  where there is no git (a Bazel sandbox), the tree as it is, without the same."""
  dst = tmp_path / "clone"
  try:
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                           cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
  except (OSError, subprocess.CalledProcessError):
    skip = {".git", ".venv", "out", "__pycache__", ".pytest_cache"}
    files = []
    for directory, subdirs, names in os.walk(ROOT):
      subdirs[:] = [d for d in subdirs if d not in skip]
      files += [os.path.relpath(os.path.join(directory, n), ROOT) for n in names]
  for name in files:
    if os.path.isfile(os.path.join(ROOT, name)):
      os.makedirs(dst / os.path.dirname(name), exist_ok=True)
      shutil.copy2(os.path.join(ROOT, name), dst / name)
  return dst


def test_readme_main_command_runs_as_written_and_resumes(tmp_path):
  """Relative output_dir ("out" by default): checkpoints every 10 steps, then a rerun resumes
  from 30 with nothing to do and leaves metrics.jsonl with each step once."""
  command = _readme_main_command()
  assert command.startswith(".venv/bin/python launch.py --config=configs/wan21_t2v.py:tiny")
  clone = _scratch_copy(tmp_path)
  argv = [sys.executable] + command.split()[1:]  # this interpreter stands in for .venv's
  first = subprocess.run(argv, cwd=clone, env=xla_env.env(2), capture_output=True, text=True,
                         timeout=300)
  assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-3000:]
  run_dir = clone / "out" / "wan21_t2v_tiny"
  assert sorted(os.listdir(run_dir / "checkpoints"), key=int) == ["10", "20", "30"]
  assert "wan2.1-t2v" in first.stdout and "per device" in first.stdout  # the plan summary
  again = subprocess.run(argv, cwd=clone, env=xla_env.env(2), capture_output=True, text=True,
                         timeout=300)
  assert again.returncode == 0, again.stderr[-3000:]
  assert again.stdout.count("resumed from step 30") == 1
  steps = [json.loads(l)["step"] for l in open(run_dir / "metrics.jsonl")]
  assert steps == list(range(1, 31))


def test_tiny_run_writes_logs_metrics_and_checkpoints(tmp_path):
  r = _launch(tmp_path, "--config.max_train_steps=4", "--config.checkpoint_every=4",
              "--config.enable_profiler=True", "--config.skip_first_n_steps_for_profiler=1",
              "--config.profiler_steps=2", "--config.enable_jax_named_scopes=True",
              "--config.remat_policy=CUSTOM",
              "--config.names_which_can_be_saved=attn_output,ffn_activation",
              "--config.synthetic_num_samples=16")
  assert r.returncode == 0, r.stderr[-3000:]
  lines = [l for l in r.stdout.splitlines() if l.startswith("step ")]
  assert len(lines) == 4 and "loss" in lines[-1] and "ETA" in lines[-1]
  assert "ETA --" in lines[0] and "ETA --" not in lines[1]  # the first step includes compiling
  run_dir = tmp_path / "wan21_t2v_tiny"
  records = [json.loads(l) for l in open(run_dir / "metrics.jsonl")]
  assert [r["step"] for r in records] == [1, 2, 3, 4]
  assert {"loss", "learning_rate", "step_time", "tflops_per_device", "grad_norm"} <= set(records[0])
  assert sorted(os.listdir(run_dir / "checkpoints")) == ["2", "4"]
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(run_dir / "tensorboard"))
  assert os.listdir(tmp_path / "jax_cache")  # the compiled step, for the next run
  traces = [f for _, _, files in os.walk(run_dir / "profile") for f in files]
  assert any(f.endswith(".xplane.pb") for f in traces), traces


@pytest.mark.parametrize("flags, config, message", [
    (["--config.num_frames=8"], "configs/wan21_t2v.py:tiny", "num_frames=8 must be 4k+1"),
    (["--config.ici_fsdp_parallelism=2"], "configs/wan21_t2v.py:tiny",
     "`ici_fsdp_parallelism` is called `ici_fsdp` here"),
    (["--config.learnig_rate=1e-4"], "configs/wan21_t2v.py:tiny",
     "unknown config field `learnig_rate`; did you mean learning_rate"),
    (["--config.train_data_dir=/nonexistent"], "configs/wan21_t2v.py:tiny",
     "train_data_dir='/nonexistent' has no effect unless job=prepare or dataset_type="),
    (["--config.ici_fsdp=two"], "configs/wan21_t2v.py:tiny", "--config.ici_fsdp=two"),
    ([], "configs/wan21_t2v.py:huge", "unknown variant 'huge'"),
    ([], "", "--config is required"),
])
def test_config_errors_are_one_clear_line(tmp_path, flags, config, message):
  r = _launch(tmp_path, *flags, config=config)
  assert r.returncode == 2, r.stderr[-2000:]
  assert message in r.stderr, r.stderr[-2000:]
  assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) <= 2, r.stderr
  assert not (tmp_path / "wan21_t2v_tiny").exists()


def test_maxdiffusion_names_map_to_ours():
  for theirs, ours in (("base_output_directory", "output_dir"), ("log_period",
                                                                "tensorboard_flush_period"),
                       ("dcn_context_parallelism", "dcn_context"),
                       ("wan_transformer_pretrained_model_name_or_path",
                        "transformer_pretrained_model_name_or_path"),
                       ("enable_eval_timesteps", "timestep_eval")):
    assert f"`{theirs}` is called `{ours}` here" in launch._field_message(theirs)  # pylint: disable=protected-access
  assert "no counterpart" in launch._field_message("jit_initializers")  # pylint: disable=protected-access
  assert "has no field `block_z`" in launch._field_message("flash_block_sizes.block_z")  # pylint: disable=protected-access
