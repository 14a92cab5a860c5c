"""Data-pipeline benchmark: decode and encode throughput of job=prepare, and the cached loader's
batches/s against the train step's consumption. Not a test.

  python benchmarks/prepare.py --config=configs/wan21_t2v.py:tiny --clips=16 \
      --frames=49 --size=240x416 --fps=24

Generates `--clips` h264 clips of --frames frames at --size and --fps in a scratch directory
(or reads --data, a folder of your own clips with captions), then prints
  decode   clips/s and frames/s of decoding + resampling + resize/crop on the host (one thread)
  encode   clips/s and frames/s of the VAE + text (+ CLIP) encoders on the devices
  prepare  wall time of the whole job (probe, decode, encode, write)
  loader   batches/s of the cached stream (host reads and assembly) against the train step
"""

import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file[:variant].")
_CLIPS = flags.DEFINE_integer("clips", 8, "Generated clips.")
_FRAMES = flags.DEFINE_integer("frames", 33, "Frames per generated clip.")
_SIZE = flags.DEFINE_string("size", "128x224", "HxW of the generated clips.")
_FPS = flags.DEFINE_float("fps", 24.0, "Frame rate of the generated clips.")
_DATA = flags.DEFINE_string("data", "", "A folder of your own clips instead.")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed train steps / loader batches.")


def _timed(fn, *args):
  t0 = time.perf_counter()
  out = fn(*args)
  return out, time.perf_counter() - t0


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  import jax
  import numpy as np
  from tests import clip_fixtures
  from wan import data, plan as plan_lib, train
  from wan.data import clips as clips_lib
  from wan.data import encode as encode_lib
  from wan.data import prepare

  scratch = tempfile.mkdtemp(prefix="wan_prepare_bench_")
  folder = _DATA.value
  if not folder:
    folder = os.path.join(scratch, "clips")
    os.makedirs(folder)
    h, w = map(int, _SIZE.value.split("x"))
    for i in range(_CLIPS.value):
      clip_fixtures.write_video(os.path.join(folder, f"{i}.mp4"), _FRAMES.value, _FPS.value,
                                h, w, seed=i)
      with open(os.path.join(folder, f"{i}.txt"), "w") as f:
        f.write(f"clip number {i} of moving colours")
  c = _CONFIG.value
  c.job, c.train_data_dir = "prepare", folder
  c.tfrecords_dir = os.path.join(scratch, "cache")
  prep = plan_lib.preparation(c)
  (_, datasets, out), = prep.splits
  keyed, skipped = prepare.keyed_clips(datasets, prep.encoding)
  pixels, decode_s = _timed(lambda: [clips_lib.read_pixels(clip) for _, clip in keyed])
  frames = sum(len(p) for p in pixels)
  enc = encode_lib.load(prep.encoding)
  devices = enc.mesh.devices.size
  by_shape = {}
  for (_, clip), p in zip(keyed, pixels):
    by_shape.setdefault(p.shape, []).append((clip.item.caption, p))
  for group in by_shape.values():  # compile once per bucket, untimed
    encode_lib.encode(enc, np.stack([p for _, p in group[:devices]]),
                      [t for t, _ in group[:devices]])

  def encode_all():
    for group in by_shape.values():
      for i in range(0, len(group), devices):
        chunk = group[i:i + devices]
        encode_lib.encode(enc, np.stack([p for _, p in chunk]), [t for t, _ in chunk])
  _, encode_s = _timed(encode_all)
  _, prepare_s = _timed(prepare.run, prep)

  train_cfg = _CONFIG.value
  train_cfg.job, train_cfg.dataset_type, train_cfg.train_data_dir = "train", "tfrecord", out
  train_cfg.tfrecords_dir, train_cfg.output_dir = "", os.path.join(scratch, "out")
  train_cfg.checkpoint_every, train_cfg.write_metrics = -1, False
  p = plan_lib.make(train_cfg, jax.devices())
  run = train.setup(p)
  it = data.make(run.plan, run.mesh)
  next(it)  # the prefetch thread is running
  batches, load_s = _timed(lambda: [next(it) for _ in range(_STEPS.value)])
  jax.block_until_ready(batches)
  state = train.init_state(run)
  step = train.make_step(run)
  with jax.set_mesh(run.mesh):
    state, _ = step(state, batches[0])  # compile
    jax.block_until_ready(state)
    t0 = time.perf_counter()
    for b in batches:
      if b["latents"].shape == batches[0]["latents"].shape:
        state, _ = step(state, b)
    jax.block_until_ready(state)
    same = sum(b["latents"].shape == batches[0]["latents"].shape for b in batches)
    step_s = (time.perf_counter() - t0) / same
  it.close()

  n = len(keyed)
  print(f"devices   {devices} x {jax.devices()[0].device_kind} (jax {jax.__version__})")
  print(f"data      {n} clips ({frames} frames after resampling to {prep.encoding.fps:g} fps),"
        f" {len(skipped)} skipped, from {folder}")
  print(f"decode    {n / decode_s:.2f} clips/s, {frames / decode_s:.1f} frames/s "
        "(decode + resample + resize/crop, one host thread)")
  print(f"encode    {n / encode_s:.2f} clips/s, {frames / encode_s:.1f} frames/s "
        f"(encoders {prep.encoding.vae}, {len(by_shape)} buckets)")
  print(f"prepare   {prepare_s:.1f} s for the whole job")
  print(f"loader    {_STEPS.value / load_s:.1f} batches/s (global batch {p.global_batch}); "
        f"the train step takes {step_s * 1e3:.1f} ms = {1 / step_s:.1f} batches/s "
        f"-> loader/step = {step_s * _STEPS.value / load_s:.1f}x")


if __name__ == "__main__":
  flags.mark_flag_as_required("config")
  app.run(main)
