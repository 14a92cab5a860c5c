"""Training that survives its own failures: a diverging run skips its non-finite steps, stops
after max_nonfinite_steps of them with a clear message, never writes a non-finite checkpoint and
resumes from the last good one; SIGTERM / SIGINT save at the step boundary and the rerun resumes
exactly; a second run on an active run directory is refused; gradient accumulation equals the
larger batch."""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import wan21_t2v
from tests import damage, xla_env
from wan import checkpoint, data, guards, plan, train
from wan.errors import CheckpointError, ConfigError, TrainingStopped


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tiny(**overrides):
  c = wan21_t2v.get_config("tiny")
  c.update(dict(checkpoint_every=-1, write_metrics=False, global_batch_size=4,
                warmup_steps_fraction=0.0))
  c.update(overrides)
  return c


def _devices():
  return jax.devices()[:1]


def _all_checkpoints_finite(c):
  run_dir = os.path.join(c.output_dir, c.run_name)
  ckpt = checkpoint.Checkpointer(c.checkpoint_dir or os.path.join(run_dir, "checkpoints"), 3,
                                 True)
  steps = ckpt._manager.all_steps()  # pylint: disable=protected-access
  run = train.setup(plan.make(c, _devices()), _devices())
  try:
    for step in steps:
      state, _ = ckpt.restore(step, train.abstract_state(run))
      assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state["params"]))
  finally:
    ckpt.close()
  return steps


def test_a_diverging_run_skips_its_nonfinite_steps_and_stops(tmp_path):
  c = _tiny(learning_rate=1e6, max_train_steps=30, checkpoint_every=4, max_nonfinite_steps=3,
            write_metrics=True, output_dir=str(tmp_path))
  with pytest.raises(TrainingStopped, match="3 non-finite steps in a row.*resumes from the "
                                            "newest checkpoint"):
    train.train(plan.make(c, _devices()), _devices())
  rows = [json.loads(line) for line in open(tmp_path / "wan21_t2v_tiny" / "metrics.jsonl")]
  assert rows[-1]["nonfinite_steps"] == 3 and rows[-1]["loss"] is None
  assert len(rows) < 10
  assert _all_checkpoints_finite(c)  # no checkpoint holds a non-finite parameter


class _NanAt:
  """A data stream whose batch at step `bad` (0-based, counted from `first`) has NaN latents."""

  def __init__(self, it, bad, first=0):
    self._it, self._bad, self._step = it, bad, first

  def __next__(self):
    batch = next(self._it)
    if self._step == self._bad:
      batch = dict(batch, latents=batch["latents"] * np.nan)
    self._step += 1
    return batch

  def __getattr__(self, name):
    return getattr(self._it, name)


def test_a_nan_batch_is_skipped_or_stops_the_run_and_the_rerun_equals_a_clean_one(
    tmp_path, monkeypatch):
  clean = train.train(plan.make(_tiny(max_train_steps=6, output_dir=str(tmp_path / "clean")),
                                _devices()), _devices())
  make = data.make
  monkeypatch.setattr(train.data, "make", lambda p, mesh: _NanAt(make(p, mesh), bad=3))
  # Tolerated: the step is skipped (its update not applied) and the run goes on.
  skipped = train.train(plan.make(_tiny(max_train_steps=6, output_dir=str(tmp_path / "skip"),
                                        max_nonfinite_steps=2), _devices()), _devices())
  assert np.isnan(skipped[3]) and np.isfinite(skipped[:3] + skipped[4:]).all()
  assert skipped[:3] == clean[:3]
  # Not tolerated: the run stops at step 4; the rerun resumes from step 3's checkpoint.
  c = _tiny(max_train_steps=6, checkpoint_every=4, output_dir=str(tmp_path / "stop"),
            max_nonfinite_steps=1)
  with pytest.raises(TrainingStopped, match="1 non-finite steps in a row up to step 4"):
    train.train(plan.make(c, _devices()), _devices())
  assert _all_checkpoints_finite(c)[-1] == 3
  monkeypatch.setattr(train.data, "make", make)
  rest = train.train(plan.make(c, _devices()), _devices())
  assert rest == clean[3:]  # bit for bit what an uninterrupted run does


def _loss_and_grads(c, devices):
  run = train.setup(plan.make(c, devices), devices)
  params = train.init_state(run)["params"]
  batch = next(data.make(run.plan, run.mesh))
  key = jax.random.key(3)
  with jax.set_mesh(run.mesh):
    loss, _, grads = jax.jit(lambda p, b: train._loss_and_grads(  # pylint: disable=protected-access
        run.plan, lambda x: x, p, b, key, None))(params, batch)
  return float(loss), jax.device_get(grads)


def test_accumulation_equals_the_larger_batch():
  mesh, devices = dict(ici_data=2, ici_fsdp=4), jax.devices()  # micro-batches split over data
  want_loss, want = _loss_and_grads(_tiny(precision="HIGHEST", **mesh), devices)
  loss, got = _loss_and_grads(_tiny(precision="HIGHEST", gradient_accumulation_steps=2, **mesh),
                              devices)
  assert abs(loss - want_loss) <= 1e-5 * abs(want_loss)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * np.abs(b).max())


def test_accumulation_refusals():
  with pytest.raises(ConfigError, match="gradient_accumulation_steps=3 does not split the "
                                        "global batch 4.*use 1, 2 or 4"):
    plan.make(_tiny(gradient_accumulation_steps=3), _devices())
  with pytest.raises(ConfigError, match="gradient_accumulation_steps=0 must be >= 1"):
    plan.make(_tiny(gradient_accumulation_steps=0), _devices())
  p = plan.make(_tiny(gradient_accumulation_steps=4, max_train_steps=2), _devices())
  assert p.accumulation == 4 and "4 micro-batches of 1" in p.summary()
  assert np.isfinite(train.train(p, _devices())).all()  # the training step runs with it


class _SignalAt:
  """A data stream that sends this process `sig` when it hands out the batch of step `at`."""

  def __init__(self, it, sig, at):
    self._it, self._sig, self._at, self._step = it, sig, at, 0

  def __next__(self):
    batch = next(self._it)
    if self._step == self._at:
      os.kill(os.getpid(), self._sig)
    self._step += 1
    return batch

  def __getattr__(self, name):
    return getattr(self._it, name)


def test_sigint_asks_to_stop_and_a_second_one_stops_at_once():
  with guards.StopRequests() as stops:
    assert not stops.due(1)
    os.kill(os.getpid(), signal.SIGINT)
    assert stops.due(2) and stops.reason == "SIGINT"
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGINT)
  assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_sigterm_saves_at_the_step_boundary_and_the_rerun_resumes_exactly(tmp_path, monkeypatch):
  sig = signal.SIGTERM
  clean = train.train(plan.make(_tiny(max_train_steps=6, output_dir=str(tmp_path / "clean")),
                                _devices()), _devices())
  make = data.make
  monkeypatch.setattr(train.data, "make", lambda p, mesh: _SignalAt(make(p, mesh), sig, 2))
  c = _tiny(max_train_steps=6, checkpoint_every=100, output_dir=str(tmp_path / "run"))
  first = train.train(plan.make(c, _devices()), _devices())
  assert first == clean[:3]  # stopped after the step in flight, which was saved
  assert checkpoint.Checkpointer(str(tmp_path / "run" / "wan21_t2v_tiny" / "checkpoints"), 3,
                                 True).latest_step() == 3
  monkeypatch.setattr(train.data, "make", make)
  assert train.train(plan.make(c, _devices()), _devices()) == clean[3:]
  assert signal.getsignal(sig) == signal.SIG_DFL  # our handler is gone after the run


def test_a_second_run_on_the_same_directory_is_refused(tmp_path):
  c = _tiny(max_train_steps=2, output_dir=str(tmp_path))
  run_dir = tmp_path / "wan21_t2v_tiny"
  run_dir.mkdir()
  (run_dir / ".lock").write_text(f"{socket.gethostname()} {os.getpid()}\n")  # an active run
  with pytest.raises(ConfigError, match="another run .* is using .*set another run_name"):
    train.train(plan.make(c, _devices()), _devices())
  dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                        capture_output=True, text=True, check=True).stdout.strip()
  (run_dir / ".lock").write_text(f"{socket.gethostname()} {dead}\n")  # left by a killed run
  assert len(train.train(plan.make(c, _devices()), _devices())) == 2
  assert not (run_dir / ".lock").exists()


def test_a_checkpoint_restores_onto_another_mesh_and_continues(tmp_path):
  """A 4-step run on fsdp 8 checkpoints every step; its step-2 checkpoint alone continues on 4
  devices as fsdp 2 x context 2, with the losses of the uninterrupted run's steps 3 and 4."""
  eight, four = jax.devices(), jax.devices()[:4]
  c = _tiny(ici_fsdp=8, max_train_steps=4, checkpoint_every=4, checkpoints_to_keep=4,
            precision="HIGHEST", output_dir=str(tmp_path / "a"))
  straight = train.train(plan.make(c, eight), eight)
  moved = tmp_path / "b" / c.run_name / "checkpoints"
  moved.parent.mkdir(parents=True)
  os.rename(tmp_path / "a" / c.run_name / "checkpoints", moved)
  for step in ("3", "4"):
    shutil.rmtree(moved / step)
  c.update(dict(ici_fsdp=2, ici_context=2, output_dir=str(tmp_path / "b")))
  rest = train.train(plan.make(c, four), four)
  np.testing.assert_allclose(rest, straight[2:], rtol=1e-5)


def test_a_damaged_newest_checkpoint_is_set_aside_and_the_one_before_used(tmp_path, capsys):
  """Damage found by the file sizes that each completed save lists, and, in a checkpoint without
  that list (its process killed before writing it), by orbax's restore."""
  clean = train.train(plan.make(_tiny(max_train_steps=8, output_dir=str(tmp_path / "clean")),
                                _devices()), _devices())
  c = _tiny(max_train_steps=4, checkpoint_every=4, output_dir=str(tmp_path / "run"))
  train.train(plan.make(c, _devices()), _devices())
  checkpoints = tmp_path / "run" / "wan21_t2v_tiny" / "checkpoints"
  assert sorted(os.listdir(checkpoints)) == ["2", "3", "4"]
  assert damage.truncate(checkpoints / "4" / "state")  # the newest checkpoint
  capsys.readouterr()
  c.max_train_steps = 6
  rest = train.train(plan.make(c, _devices()), _devices())
  assert rest == clean[3:6]  # resumed from step 3, exactly
  assert "4.damaged" in os.listdir(checkpoints)  # its files kept, out of orbax's way
  assert re.search(r"checkpoint at step 4 cannot be restored \(its file state/\S+ has \d+ "
                   r"bytes, \d+ when it was saved\); it was moved to \S+4.damaged and the run "
                   r"resumes from step 3", capsys.readouterr().out)
  # The two newest damaged, the newest without its sizes: back to step 4, saved again.
  assert sorted(n for n in os.listdir(checkpoints) if n.isdigit()) == ["4", "5", "6"]
  for step in ("5", "6"):
    assert damage.truncate(checkpoints / step / "state")
  os.remove(checkpoints / "6" / checkpoint.SIZES)
  c.max_train_steps = 8
  rest = train.train(plan.make(c, _devices()), _devices())
  assert rest == clean[4:]
  out = capsys.readouterr().out
  assert re.search(r"checkpoint at step 6 cannot be restored \(.+\); it was moved", out), out
  assert "checkpoint at step 5 cannot be restored (its file state/" in out
  # Every checkpoint damaged: the newest one's error, and nothing moved.
  for step in ("6", "7", "8"):
    assert damage.truncate(checkpoints / step / "state")
  before = sorted(os.listdir(checkpoints))
  c.max_train_steps = 10
  with pytest.raises(CheckpointError, match="checkpoint at step 8 .* cannot be restored"):
    train.train(plan.make(c, _devices()), _devices())
  assert sorted(os.listdir(checkpoints)) == before


def test_a_full_disk_fails_the_save_with_one_message_and_keeps_the_earlier_checkpoints(tmp_path):
  """The checkpoints go to a 1.6 MB tmpfs that holds two of the tiny model's (~0.65 MB each):
  the third save fails with one message, and the two before it restore."""
  disk = tmp_path / "disk"
  disk.mkdir()
  mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1600k", "tmpfs", str(disk)],
                           capture_output=True)
  if mounted.returncode:
    pytest.skip("mounting a small tmpfs needs root")
  try:
    c = _tiny(max_train_steps=6, checkpoint_every=4, checkpoints_to_keep=10,
              output_dir=str(tmp_path / "out"), checkpoint_dir=str(disk))
    r = subprocess.run([sys.executable, "launch.py", "--config=configs/wan21_t2v.py:tiny",
                        *(f"--config.{k}={getattr(c, k)}" for k in (
                            "max_train_steps", "checkpoint_every", "checkpoints_to_keep",
                            "output_dir", "checkpoint_dir", "global_batch_size",
                            "write_metrics"))],
                       cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env=xla_env.env(1))
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert "checkpoint at step 3 could not be written: no space left on the disk of" in last
    assert "newest: step 2" in last, r.stderr[-3000:]
    assert len(r.stderr.strip().splitlines()) < 20, r.stderr  # no thread noise
    assert not [n for n in os.listdir(disk) if "tmp" in n]  # the partial write is gone
    assert sorted(_all_checkpoints_finite(c)) == [1, 2]  # both restore
  finally:
    subprocess.run(["umount", str(disk)], check=False)
