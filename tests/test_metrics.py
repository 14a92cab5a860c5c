"""Metrics writer: console line with progress and ETA, metrics.jsonl, TensorBoard events (scalars,
videos as GIFs); the device peak table; local file layer."""

import json
import os
import types

import imageio.v3 as iio
import numpy as np
from tensorboard.backend.event_processing import event_accumulator

from wan import fs, metrics


def test_writer_console_jsonl_and_tensorboard(tmp_path, capsys):
  w = metrics.Writer(str(tmp_path), total_steps=4, flush_every=1)
  for step in (1, 2):
    w.write(step, {"loss": 0.5 / step, "learning_rate": 1e-4, "step_time": 0.25,
                   "tflops_per_device": 2.0, "mfu": None, "grad_norm": 1.5})
  w.close()
  lines = capsys.readouterr().out.splitlines()
  assert lines[1].startswith("step 2/4 [##########..........]")
  assert "loss 0.25000" in lines[1] and "ETA" in lines[1] and "MFU" not in lines[1]
  records = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  assert records[1] == {"step": 2, "loss": 0.25, "learning_rate": 1e-4, "step_time": 0.25,
                        "tflops_per_device": 2.0, "grad_norm": 1.5}
  acc = event_accumulator.EventAccumulator(str(tmp_path / "tensorboard"))
  acc.Reload()
  assert [e.value for e in acc.Scalars("loss")] == [0.5, 0.25]


def test_non_finite_values_are_json_null_and_eta_skips_the_first_step(tmp_path, capsys):
  w = metrics.Writer(str(tmp_path), total_steps=3, flush_every=1)
  for step, loss in ((1, float("nan")), (2, 0.5), (3, float("inf"))):
    w.write(step, {"loss": loss, "learning_rate": 1e-4, "step_time": 0.1})
  w.close()
  text = open(tmp_path / "metrics.jsonl").read()
  assert "NaN" not in text and "Infinity" not in text
  records = [json.loads(l) for l in text.splitlines()]  # strict JSON
  assert [r["loss"] for r in records] == [None, 0.5, None]
  lines = capsys.readouterr().out.splitlines()
  assert lines[0].endswith("ETA --") and not lines[1].endswith("ETA --")


def test_resumed_writer_drops_rows_after_the_checkpoint(tmp_path):
  w = metrics.Writer(str(tmp_path), total_steps=6, flush_every=1)
  for step in range(1, 6):  # an interrupted run logged 5 steps; its last checkpoint is step 3
    w.write(step, {"loss": float(step), "learning_rate": 1e-4, "step_time": 0.1})
  w.close()
  w = metrics.Writer(str(tmp_path), total_steps=6, flush_every=1, first_step=3)
  for step in range(4, 7):
    w.write(step, {"loss": 10.0 + step, "learning_rate": 1e-4, "step_time": 0.1})
  w.close()
  records = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
  assert [r["loss"] for r in records] == [1.0, 2.0, 3.0, 14.0, 15.0, 16.0]
  acc = event_accumulator.EventAccumulator(str(tmp_path / "tensorboard"))
  acc.Reload()  # the session start at step 3 purges the old 4 and 5
  assert [(e.step, e.value) for e in acc.Scalars("loss")] == [
      (1, 1.0), (2, 2.0), (3, 3.0), (4, 14.0), (5, 15.0), (6, 16.0)]


def test_peak_table():
  assert metrics.peak_tflops(types.SimpleNamespace(device_kind="TPU v5p")) == 459.0
  assert metrics.peak_tflops(types.SimpleNamespace(device_kind="TPU v5 lite")) == 197.0
  assert metrics.peak_tflops(types.SimpleNamespace(device_kind="NVIDIA H100 80GB HBM3")) == 989.4
  assert metrics.peak_tflops(types.SimpleNamespace(device_kind="cpu")) is None


def test_fs_local(tmp_path):
  path = fs.join(str(tmp_path), "a", "b")
  fs.makedirs(path)
  with fs.open_file(fs.join(path, "f.txt"), "w") as f:
    f.write("x")
  assert fs.exists(os.path.join(tmp_path, "a", "b", "f.txt"))
  assert fs.join("gs://bucket/", "run") == "gs://bucket/run" and fs.is_remote("gs://b")


def test_videos_are_animated_gifs_in_tensorboard(tmp_path):
  video = np.linspace(0, 1, 5 * 12 * 20 * 3, dtype=np.float32).reshape(5, 12, 20, 3)
  w = metrics.Writer(str(tmp_path), total_steps=4)
  w.write_videos(3, {"samples/cat": video, "samples/dog": video[:2]}, fps=16)
  w.close()
  acc = event_accumulator.EventAccumulator(str(tmp_path / "tensorboard"))
  acc.Reload()
  assert sorted(acc.Tags()["images"]) == ["samples/cat", "samples/dog"]
  (cat,) = acc.Images("samples/cat")
  assert (cat.step, cat.height, cat.width) == (3, 12, 20)
  assert cat.encoded_image_string[:6] == b"GIF89a"
  assert iio.imread(cat.encoded_image_string, index=None).shape[0] == 5
  assert iio.imread(acc.Images("samples/dog")[0].encoded_image_string, index=None).shape[0] == 2
  off = metrics.Writer(str(tmp_path / "off"), total_steps=4, write_files=False)
  off.write_videos(3, {"samples/cat": video}, fps=16)
  assert not os.path.exists(tmp_path / "off")
