"""job=prepare end to end on the tiny config: a folder of generated clips (several sizes, aspect
ratios, frame rates, lengths, an image, and bad files) to a cache, training on it, resume."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import wan21_i2v, wan21_t2v, wan22_ti2v
from tests import clip_fixtures
from wan import plan, train
from wan.data import prepare, records
from wan.errors import CheckpointError, ConfigError, MissingFile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(module=wan21_t2v, **fields):
  c = module.get_config("tiny")
  c.write_metrics = True
  c.update(fields)
  return c


def _prepare(c):
  return prepare.run(plan.preparation(c))["train"]


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
  return clip_fixtures.make_folder(tmp_path_factory.mktemp("clips"))


@pytest.fixture(scope="module")
def cache(clips, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("cache") / "c")
  c = _config(job="prepare", train_data_dir=clips, tfrecords_dir=out, enable_bucket=True,
              no_records_per_shard=1)
  return out, _prepare(c)


def test_prepare_skips_bad_files_and_names_them(cache):
  _, manifest = cache
  skipped = dict(manifest["skipped"])
  assert set(map(os.path.basename, skipped)) == {"corrupt.mp4", "empty.mp4", "nocaption.mp4",
                                                 "short.mp4"}, skipped
  reasons = {os.path.basename(k): v for k, v in skipped.items()}
  assert "empty" in reasons["empty.mp4"] and "caption" in reasons["nocaption.mp4"]
  assert "too short" in reasons["short.mp4"] and "decodable" in reasons["corrupt.mp4"]


def test_prepare_buckets_and_shards(cache):
  out, manifest = cache
  # wide 48x80 -> bucket 48x80 (latents 6x10), tall 80x48 -> 10x6, square / image 64x64 -> 8x8,
  # the image is one frame (1 latent frame), the videos 5 frames (2 latent frames).
  assert {n: b["records"] for n, b in manifest["buckets"].items()} == {
      "1x8x8": 1, "2x10x6": 1, "2x6x10": 1, "2x8x8": 1}
  assert all(len(s["records"]) == 1 for s in manifest["shards"])  # no_records_per_shard=1
  files = sorted(n for n in os.listdir(out) if n.endswith(".tfrecord"))
  assert files == sorted(s["file"] for s in manifest["shards"])
  identity = manifest["identity"]
  assert identity["vae"] == "builtin-tiny" and identity["latent_space"] == "wan2.1"


def test_records_are_standard_tfrecords(cache):
  """tf.data reads the shards as they are (the framing is TensorFlow's own)."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  out, manifest = cache
  shard = manifest["shards"][0]
  raw = list(tf.data.TFRecordDataset(os.path.join(out, shard["file"])).as_numpy_iterator())
  assert len(raw) == 1
  sample = records.from_bytes(raw[0])
  entry = shard["records"][0]
  assert sample["key"] == entry["key"] and sample["text"].shape[0] == entry["text_length"]
  via_offsets = records.Reader(out, manifest).read(shard["file"], entry)
  np.testing.assert_array_equal(via_offsets["latents"], sample["latents"])


def test_training_on_the_cache_resumes_exactly(cache, tmp_path):
  out, _ = cache
  fields = dict(dataset_type="tfrecord", train_data_dir=out, max_train_steps=6,
                checkpoint_every=6, precision="HIGHEST", global_batch_size=2)
  whole = train.train(plan.make(_config(output_dir=str(tmp_path / "a"), **fields), jax.devices()))
  first = train.train(plan.make(_config(output_dir=str(tmp_path / "b"), **dict(
      fields, max_train_steps=3)), jax.devices()))
  second = train.train(plan.make(_config(output_dir=str(tmp_path / "b"), **fields),
                                 jax.devices()))
  assert len(whole) == 6 and len(first) == 3 and len(second) == 3
  np.testing.assert_allclose(first + second, whole, rtol=1e-6)
  p = plan.make(_config(output_dir=str(tmp_path / "c"), **fields), jax.devices())
  assert p.data.steps_per_epoch == 4  # 4 buckets of one sample: one (filled) batch each
  assert len(p.data.buckets) == 4


def test_prepare_again_is_a_no_op_and_other_encoders_are_refused(cache, clips):
  out, manifest = cache
  c = _config(job="prepare", train_data_dir=clips, tfrecords_dir=out, enable_bucket=True,
              no_records_per_shard=1)
  assert _prepare(c) == manifest
  other = _config(wan22_ti2v, job="prepare", train_data_dir=clips, tfrecords_dir=out)
  with pytest.raises(ConfigError, match="other encoders"):
    plan.preparation(other)


def test_cache_of_another_family_is_refused(cache):
  out, _ = cache
  c = _config(wan21_i2v, dataset_type="tfrecord", train_data_dir=out)
  with pytest.raises(ConfigError, match="prepared for wan2.1-t2v"):
    plan.make(c, jax.devices())
  c = _config(dataset_type="tfrecord", train_data_dir=out, height=128)
  with pytest.raises(ConfigError, match="height=128 but .* prepared with height=64"):
    plan.make(c, jax.devices())
  c = _config(dataset_type="grain", train_data_dir=out)
  with pytest.raises(ConfigError, match="dataset_type=tfrecord"):
    plan.make(c, jax.devices())


def test_damaged_cache_is_named(cache, tmp_path):
  out, manifest = cache
  copy = tmp_path / "copy"
  copy.mkdir()
  for name in os.listdir(out):
    if os.path.isfile(os.path.join(out, name)):
      with open(os.path.join(out, name), "rb") as f:
        (copy / name).write_bytes(f.read())
  shard = manifest["shards"][0]
  path = copy / shard["file"]
  data = bytearray(path.read_bytes())
  data[len(data) // 2] ^= 0xFF
  path.write_bytes(bytes(data))
  with pytest.raises(CheckpointError, match="damaged"):
    records.Reader(str(copy), manifest).read(shard["file"], shard["records"][0])
  os.remove(copy / manifest["shards"][1]["file"])
  with pytest.raises(CheckpointError, match="missing"):
    records.read_manifest(str(copy))
  os.remove(copy / records.MANIFEST)
  with pytest.raises(MissingFile, match="job=prepare"):
    records.read_manifest(str(copy))


def test_killed_preparation_resumes_without_redoing_finished_shards(clips, tmp_path,
                                                                     monkeypatch):
  out = str(tmp_path / "cache")
  c = _config(job="prepare", train_data_dir=clips, tfrecords_dir=out, no_records_per_shard=1)
  finished = []
  real = prepare._finish  # pylint: disable=protected-access

  def finish_then_die(*args):
    finished.append(real(*args))
    if len(finished) == 2:
      raise KeyboardInterrupt("killed")  # as kill -9 after the second shard
    return finished[-1]

  monkeypatch.setattr(prepare, "_finish", finish_then_die)
  with pytest.raises(KeyboardInterrupt):
    _prepare(c)
  assert not os.path.exists(os.path.join(out, records.MANIFEST))
  monkeypatch.setattr(prepare, "_finish", real)
  encoded = []
  real_encode = prepare.encode_lib.encode
  monkeypatch.setattr(prepare.encode_lib, "encode",
                      lambda enc, videos, captions: encoded.extend(captions)
                      or real_encode(enc, videos, captions))
  manifest = _prepare(c)
  assert sum(b["records"] for b in manifest["buckets"].values()) == 4
  assert len(encoded) == 2  # the two finished shards were kept
  assert len(manifest["shards"]) == 4


def test_i2v_cache_holds_the_conditioning(clips, tmp_path):
  out = str(tmp_path / "cache")
  manifest = _prepare(_config(wan21_i2v, job="prepare", train_data_dir=clips,
                              tfrecords_dir=out))
  shard = manifest["shards"][0]
  sample = records.Reader(out, manifest).read(shard["file"], shard["records"][0])
  assert sample["cond"].shape == sample["latents"].shape
  assert sample["image"].shape == (257, 24)  # as ViT-H/14 at 224 px, 24 wide (tiny)
  p = plan.make(_config(wan21_i2v, dataset_type="tfrecord", train_data_dir=out,
                        max_train_steps=2, checkpoint_every=-1, write_metrics=False),
                jax.devices())
  losses = train.train(p, jax.devices())
  assert len(losses) == 2 and all(np.isfinite(losses))


def test_prepare_command_and_train_command(clips, tmp_path):
  """The two commands of the issue, as a user types them."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
  cache_dir, out = str(tmp_path / "cache"), str(tmp_path / "out")
  run = lambda *args: subprocess.run(
      [sys.executable, "launch.py", "--config=configs/wan21_t2v.py:tiny", *args], cwd=ROOT,
      env=env, capture_output=True, text=True, timeout=600)
  done = run("--config.job=prepare", f"--config.train_data_dir={clips}",
             f"--config.tfrecords_dir={cache_dir}", "--config.no_records_per_shard=2")
  assert done.returncode == 0, done.stdout + done.stderr
  for name in ("corrupt.mp4", "empty.mp4", "nocaption.mp4", "short.mp4"):
    assert name in done.stdout, done.stdout
  manifest = json.load(open(os.path.join(cache_dir, "manifest.json")))
  assert [len(s["records"]) for s in manifest["shards"]] == [1, 2, 1]  # 1x8x8: 1, 2x8x8: 3
  done = run("--config.dataset_type=tfrecord", f"--config.train_data_dir={cache_dir}",
             f"--config.output_dir={out}", "--config.max_train_steps=3")
  assert done.returncode == 0, done.stdout + done.stderr
  assert "data tfrecord" in done.stdout and "2 buckets" in done.stdout
