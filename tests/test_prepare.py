"""job=prepare end to end on the tiny config: a folder of generated clips (several sizes, aspect
ratios, frame rates, lengths, an image, and bad files) to a cache, training on it, resume."""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import wan21_i2v, wan21_t2v, wan22_ti2v
from tests import clip_fixtures, hosts, xla_env
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


def test_training_on_the_cache_resumes_exactly(clips, tmp_path):
  out = str(tmp_path / "cache")  # two buckets (the image and the videos): mixed shapes
  _prepare(_config(job="prepare", train_data_dir=clips, tfrecords_dir=out))
  fields = dict(dataset_type="tfrecord", train_data_dir=out, max_train_steps=4,
                checkpoint_every=4, precision="HIGHEST", global_batch_size=2)
  whole = train.train(plan.make(_config(output_dir=str(tmp_path / "a"), **fields), jax.devices()))
  first = train.train(plan.make(_config(output_dir=str(tmp_path / "b"), **dict(
      fields, max_train_steps=2)), jax.devices()))
  second = train.train(plan.make(_config(output_dir=str(tmp_path / "b"), **fields),
                                 jax.devices()))
  assert len(whole) == 4 and len(first) == 2 and len(second) == 2
  np.testing.assert_allclose(first + second, whole, rtol=1e-6)


def test_buckets_set_the_steps_per_epoch(cache, tmp_path):
  out, _ = cache
  p = plan.make(_config(output_dir=str(tmp_path), dataset_type="tfrecord", train_data_dir=out,
                        global_batch_size=2, max_train_steps=0, num_train_epochs=3),
                jax.devices())
  assert p.data.steps_per_epoch == 4  # 4 buckets of one sample: one (filled) batch each
  assert len(p.data.buckets) == 4 and p.num_steps == 12


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
  env = xla_env.env(2)
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
             f"--config.output_dir={out}", "--config.max_train_steps=2")
  assert done.returncode == 0, done.stdout + done.stderr
  assert "data tfrecord" in done.stdout and "2 buckets" in done.stdout


def test_musubi_toml_chunks_clips_at_the_model_fps(clips, tmp_path):
  """target_frames=[5] with frame_extraction=chunk: square (30 frames at 30 fps) and wide (24 at
  24 fps) become 16 frames at 16 fps, 3 chunks each; tall (12 at 16 fps) 2 chunks; short none.
  A video_directory reads only videos (the image is left out)."""
  toml = tmp_path / "dataset.toml"
  toml.write_text(f"""
[general]
resolution = [64, 64]
caption_extension = ".txt"
enable_bucket = false

[[datasets]]
video_directory = "{clips}"
target_frames = [5]
frame_extraction = "chunk"
num_repeats = 2
""")
  out = str(tmp_path / "cache")
  manifest = _prepare(_config(job="prepare", dataset_config=str(toml), tfrecords_dir=out))
  keys = sorted(r["key"].split("/", 1)[1] for s in manifest["shards"] for r in s["records"])
  name = lambda k: os.path.basename(k.split("@")[0])
  assert [name(k) for k in keys] == ["square.mp4"] * 3 + ["tall.mp4"] * 2 + ["wide.mp4"] * 3
  starts = sorted(int(k.split("@")[1].split("+")[0]) for k in keys if "square" in k)
  # Chunk starts 0, 5, 10 of the 16 resampled frames = source frames ceil(k * 30 / 16).
  assert starts == [0, 10, 19]
  assert manifest["buckets"]["2x8x8"]["samples"] == 16  # 8 clips x num_repeats 2


def test_grain_cache_trains_and_resumes(clips, tmp_path):
  out = str(tmp_path / "cache")
  manifest = _prepare(_config(job="prepare", dataset_type="grain", train_data_dir=clips,
                              tfrecords_dir=out))
  assert manifest["record_format"] == "arrayrecord"
  assert all(s["file"].endswith(".arrayrecord") for s in manifest["shards"])
  fields = dict(dataset_type="grain", train_data_dir=out, max_train_steps=4, checkpoint_every=4,
                precision="HIGHEST", write_metrics=False)
  whole = train.train(plan.make(_config(output_dir=str(tmp_path / "a"), **fields),
                                jax.devices()))
  half = dict(fields, max_train_steps=2, checkpoint_every=2)
  first = train.train(plan.make(_config(output_dir=str(tmp_path / "b"), **half), jax.devices()))
  second = train.train(plan.make(_config(output_dir=str(tmp_path / "b"),
                                         **dict(fields, checkpoint_every=2)), jax.devices()))
  np.testing.assert_allclose(first + second, whole, rtol=1e-6)


def test_on_the_fly_encoding_matches_the_cache(cache, clips, tmp_path):
  """dataset_type=tf encodes the same clips with the same encoders in the same order as
  training on the prepared cache: the same losses."""
  out, _ = cache
  fields = dict(max_train_steps=2, checkpoint_every=-1, write_metrics=False,
                precision="HIGHEST", global_batch_size=2)
  cached = train.train(plan.make(_config(dataset_type="tfrecord", train_data_dir=out,
                                         output_dir=str(tmp_path / "a"), **fields),
                                 jax.devices()))
  fly = train.train(plan.make(_config(dataset_type="tf", train_data_dir=clips,
                                      enable_bucket=True, output_dir=str(tmp_path / "b"),
                                      **fields), jax.devices()))
  np.testing.assert_allclose(fly, cached, rtol=1e-5)


def test_hf_dataset_streams_and_saves_its_cache(tmp_path):
  import datasets  # pylint: disable=import-outside-toplevel
  from PIL import Image  # pylint: disable=import-outside-toplevel
  images = []
  for i, (h, w) in enumerate([(64, 64), (48, 96), (70, 70)]):
    path = tmp_path / f"{i}.png"
    y, x = np.mgrid[0:h, 0:w]
    Image.fromarray(np.stack([x * 2 + i, y * 3, x + y], -1).astype(np.uint8)).save(path)
    images.append(str(path))
  ds = datasets.Dataset.from_dict({"image": images, "text": ["a", "b c", "d e f"]})
  ds = ds.cast_column("image", datasets.Image())
  root = str(tmp_path / "hf")
  datasets.DatasetDict({"train": ds}).save_to_disk(root)
  fields = dict(dataset_type="hf", dataset_name=root, max_train_steps=2, checkpoint_every=-1,
                write_metrics=False, global_batch_size=2, num_frames=1)
  p = plan.make(_config(output_dir=str(tmp_path / "a"), **fields), jax.devices())
  assert p.data.buckets == ((1, 8, 8, 16),) and p.data.steps_per_epoch == 2
  streamed = train.train(p, jax.devices())
  saved = str(tmp_path / "saved")
  keep = train.train(plan.make(_config(output_dir=str(tmp_path / "b"),
                                       dataset_save_location=saved, **fields), jax.devices()))
  assert records.read_manifest(saved)["buckets"]["1x8x8"]["records"] == 3
  np.testing.assert_allclose(keep, streamed, rtol=1e-5)


def test_two_processes_prepare_one_cache(clips, tmp_path):
  """Each of 2 processes encodes its share of the files; the merged cache holds the same samples
  as a one-process preparation."""
  multi = str(tmp_path / "multi")
  hosts.finish(hosts.start(2, 1, "--config.job=prepare", f"--config.train_data_dir={clips}",
                           f"--config.tfrecords_dir={multi}", "--config.enable_bucket=True"), 600)
  merged = records.read_manifest(multi)
  assert {s["file"].split("-")[1] for s in merged["shards"]} == {"p000", "p001"}
  single = str(tmp_path / "single")
  one = _prepare(_config(job="prepare", train_data_dir=clips, tfrecords_dir=single,
                         enable_bucket=True))
  assert merged["buckets"] == one["buckets"] and merged["skipped"] == one["skipped"]
  read = lambda cache, m: {r["key"]: records.Reader(cache, m).read(s["file"], r)
                           for s in m["shards"] for r in s["records"]}
  a, b = read(multi, merged), read(single, one)
  assert sorted(a) == sorted(b)
  for key in a:
    np.testing.assert_allclose(a[key]["latents"], b[key]["latents"], rtol=1e-5, atol=1e-6)


def _model_root(root, vae_seed: int = 0):
  """A diffusers-layout model root of tiny components: the golden transformer, UMT5 and
  tokenizer, and a tiny VAE with the Wan 2.1 latent space (16 channels) written here."""
  import dataclasses  # pylint: disable=import-outside-toplevel
  import shutil  # pylint: disable=import-outside-toplevel
  from tests.conftest import GOLDEN_DIR  # pylint: disable=import-outside-toplevel
  from wan import vae  # pylint: disable=import-outside-toplevel
  from wan.weights import convert, safetensors  # pylint: disable=import-outside-toplevel
  from wan.weights import vae as vae_weights  # pylint: disable=import-outside-toplevel
  for name, golden in (("transformer", "transformer_t2v"), ("text_encoder", "umt5_tiny"),
                       ("tokenizer", "spiece_tiny")):
    shutil.copytree(os.path.join(GOLDEN_DIR, golden), os.path.join(root, name),
                    dirs_exist_ok=True)
  cfg = dataclasses.replace(vae.PRESETS["tiny2.1"], z_dim=16, latents_mean=(0.1,) * 16,
                            latents_std=(0.9,) * 16)
  decls = vae.declarations(cfg)
  params = jax.tree.map(np.asarray, vae.init(cfg, jax.random.key(vae_seed)))
  os.makedirs(os.path.join(root, "vae"), exist_ok=True)
  safetensors.write_file(os.path.join(root, "vae", "diffusion_pytorch_model.safetensors"),
                         convert.to_tensors(params, decls, vae_weights.names(decls, cfg)))
  fields = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)
            if f.name not in ("dtype", "precision", "use_tiling") and not f.name.startswith("tile")}
  with open(os.path.join(root, "vae", "config.json"), "w") as f:
    json.dump(dict(fields, _class_name="AutoencoderKLWan"), f)
  return str(root)


def test_prepare_from_a_model_root_and_refuse_another_vae(clips, tmp_path):
  root = _model_root(tmp_path / "root")
  out = str(tmp_path / "cache")
  manifest = _prepare(_config(job="prepare", train_data_dir=clips, tfrecords_dir=out,
                              pretrained_model_name_or_path=root))
  identity = manifest["identity"]
  assert identity["vae"] not in (None, "builtin-tiny") and identity["text_encoder"]
  fields = dict(dataset_type="tfrecord", train_data_dir=out, pretrained_model_name_or_path=root,
                max_train_steps=2, checkpoint_every=-1, write_metrics=False)
  losses = train.train(plan.make(_config(output_dir=str(tmp_path / "o"), **fields),
                                 jax.devices()))
  assert len(losses) == 2 and all(np.isfinite(losses))
  _model_root(tmp_path / "root", vae_seed=1)  # the same architecture, other weights
  with pytest.raises(ConfigError, match="prepared with another vae"):
    plan.make(_config(output_dir=str(tmp_path / "o"), **fields), jax.devices())
  import shutil  # pylint: disable=import-outside-toplevel
  from tests.conftest import GOLDEN_DIR  # pylint: disable=import-outside-toplevel
  shutil.rmtree(os.path.join(root, "vae"))
  shutil.copytree(os.path.join(GOLDEN_DIR, "vae_wan21"), os.path.join(root, "vae"))  # z_dim 4
  bad = _config(job="prepare", train_data_dir=clips, tfrecords_dir=str(tmp_path / "c2"),
                pretrained_model_name_or_path=root)
  with pytest.raises(ConfigError, match="a VAE of 4 channels.*trains on 16 channels"):
    plan.preparation(bad)


def test_ti2v_image_to_video_refuses_one_frame_clips(clips, tmp_path):
  folder, out = tmp_path / "clips", str(tmp_path / "cache")
  folder.mkdir()
  for name in ("still.png", "still.txt", "square.mp4", "square.txt"):  # an image and a clip
    shutil.copy(os.path.join(clips, name), folder / name)
  _prepare(_config(wan22_ti2v, job="prepare", train_data_dir=str(folder), tfrecords_dir=out))
  with pytest.raises(ConfigError, match="one-frame clips"):
    plan.make(_config(wan22_ti2v, dataset_type="tfrecord", train_data_dir=out, model_type="I2V"),
              jax.devices())
  assert plan.make(_config(wan22_ti2v, dataset_type="tfrecord", train_data_dir=out),
                   jax.devices()).data.steps_per_epoch
