"""Per-step metrics: console line with a progress bar and ETA, metrics.jsonl and TensorBoard
(scalars, and videos as animated GIFs).

Only process 0 writes. TFLOPS per device = 3 x forward FLOPs (forward + backward, as MaxDiffusion
counts; remat recomputation not included) / step time / devices; MFU divides that by the device's
dense bf16 peak where it is known.
"""

import collections
import json
import math
import time

import jax
import numpy as np

from wan import flops, fs, media
from wan.errors import TrainingStopped

# Dense bfloat16 peak TFLOP/s per device (one chip for TPUs; jax.Device.device_kind prefixes).
# Sources: Google Cloud TPU system-architecture pages (v4 275, v5e 197, v5p 459, v6e 918,
# 7x/Ironwood 2307) and NVIDIA H100/H200 SXM datasheets (989.4 dense, without sparsity).
PEAK_TFLOPS = (
    ("TPU v4", 275.0), ("TPU v5 lite", 197.0), ("TPU v5e", 197.0), ("TPU v5p", 459.0),
    ("TPU v5", 459.0), ("TPU v6 lite", 918.0), ("TPU v6e", 918.0), ("TPU7x", 2307.0),
    ("TPU 7x", 2307.0), ("NVIDIA H100", 989.4), ("NVIDIA H200", 989.4),
)


def peak_tflops(device) -> float | None:
  kind = getattr(device, "device_kind", "")
  for prefix, peak in PEAK_TFLOPS:
    if kind.startswith(prefix):
      return peak
  return None


def bar(done, total, width=20):
  """A text progress bar: [#####...............]."""
  filled = int(width * done / max(total, 1))
  return "[" + "#" * filled + "." * (width - filled) + "]"


def _duration(seconds):
  seconds = int(max(seconds, 0))
  return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _finite_or_none(v):
  return v if math.isfinite(v) else None  # NaN / inf are not JSON


def _keep_rows_until(path: str, step: int):
  """Drops the rows of a metrics.jsonl after `step` (a resumed run writes them again)."""
  if not fs.exists(path):
    return
  with fs.open_file(path) as f:
    lines = f.read().splitlines()
  kept = [l for l in lines if l.strip() and json.loads(l).get("step", 0) <= step]
  if len(kept) == len(lines):
    return
  tmp = fs.sibling(path, "tmp")  # written whole, then renamed over the old file
  with fs.open_file(tmp, "w") as f:
    f.write("".join(l + "\n" for l in kept))
  fs.replace(tmp, path)


class Writer:
  """Writes one record per logged step to the console, metrics.jsonl and TensorBoard.

  A run resumed at `first_step` drops the rows after it that an interrupted run left (in
  metrics.jsonl; TensorBoard is told to purge them with a session-start event).
  """

  def __init__(self, run_dir: str, total_steps: int, write_files: bool = True,
               flush_every: int = 10, first_step: int = 0):
    self._total = total_steps
    self._on = jax.process_index() == 0
    self._files = self._on and write_files
    self._flush_every = max(1, flush_every)
    self._first_done = None  # (time, step) of the first step this process logged
    self._jsonl = self._tb = None
    if self._files:
      fs.makedirs(run_dir)
      path = fs.join(run_dir, "metrics.jsonl")
      _keep_rows_until(path, first_step)
      self._jsonl = fs.open_file(path, "a")
      from tensorboard.compat.proto import event_pb2
      from tensorboard.summary.writer.event_file_writer import EventFileWriter
      self._tb = EventFileWriter(fs.join(run_dir, "tensorboard"))
      if first_step:  # TensorBoard drops the events at and after a session start's step
        self._tb.add_event(event_pb2.Event(
            wall_time=time.time(), step=first_step + 1,
            session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START)))

  def _eta(self, step: int) -> str:
    # The first step includes compilation: the rate comes from the steps after it.
    now = time.time()
    if self._first_done is None:
      self._first_done = (now, step)
    start, start_step = self._first_done
    if step == start_step:
      return "--"
    return _duration((now - start) / (step - start_step) * (self._total - step))

  def write(self, step: int, metrics: dict):
    """`metrics`: name -> number (None: not known, skipped); non-finite values are null."""
    if not self._on:
      return
    metrics = {k: float(v) for k, v in metrics.items() if v is not None}
    parts = [f"step {step}/{self._total} {bar(step, self._total)}",
             f"loss {metrics['loss']:.5f}", f"lr {metrics['learning_rate']:.3g}",
             f"{metrics['step_time']:.3f} s/step"]
    if "tflops_per_device" in metrics:
      parts.append(f"{metrics['tflops_per_device']:.2f} TFLOP/s/dev")
    if "mfu" in metrics:
      parts.append(f"MFU {100 * metrics['mfu']:.1f}%")
    parts.append(f"ETA {self._eta(step)}")
    print(" | ".join(parts), flush=True)
    self._row(step, metrics)
    if self._files and step % self._flush_every == 0:
      self.flush()

  def write_eval(self, step: int, metrics: dict):
    """Evaluation results (names starting with eval/): a console line, a metrics.jsonl row of
    their own at `step` and TensorBoard scalars; flushed at once."""
    if not self._on:
      return
    metrics = {k: float(v) for k, v in metrics.items()}
    print(f"eval at step {step}: " + " | ".join(
        f"{k[len('eval/'):]} {v:.5f}" for k, v in metrics.items()), flush=True)
    self._row(step, metrics)
    self.flush()

  def _row(self, step: int, metrics: dict):
    if self._files:
      row = {"step": step, **{k: _finite_or_none(v) for k, v in metrics.items()}}
      self._jsonl.write(json.dumps(row, allow_nan=False) + "\n")
      self._add_scalars(step, metrics)

  def _add_scalars(self, step, metrics):
    from tensorboard.compat.proto import event_pb2, summary_pb2
    summary = summary_pb2.Summary(value=[
        summary_pb2.Summary.Value(tag=k, simple_value=v) for k, v in metrics.items()])
    self._tb.add_event(event_pb2.Event(wall_time=time.time(), step=step, summary=summary))

  def write_videos(self, step: int, videos: dict[str, np.ndarray], fps: float):
    """`videos`: name -> (F, H, W, 3) float in [0, 1] (or uint8), each a TensorBoard image under
    tag `name`: an animated GIF, which the image plugin plays. Flushed at once (videos are rare)."""
    if not self._files:
      return
    from tensorboard.compat.proto import event_pb2, summary_pb2
    values = []
    for name, video in videos.items():
      gif = media.gif_bytes(video, fps)  # checks the shape
      height, width = np.shape(video)[1:3]
      image = summary_pb2.Summary.Image(height=height, width=width, colorspace=3,
                                        encoded_image_string=gif)
      values.append(summary_pb2.Summary.Value(tag=name, image=image))
    self._tb.add_event(event_pb2.Event(wall_time=time.time(), step=step,
                                       summary=summary_pb2.Summary(value=values)))
    self._tb.flush()

  def flush(self):
    if self._files:
      self._jsonl.flush()
      self._tb.flush()

  def close(self):
    if self._files:
      self.flush()
      self._jsonl.close()
      self._tb.close()


def log(message):
  """A line on process 0's console."""
  if jax.process_index() == 0:
    print(message, flush=True)


class Profiler:
  """Traces steps [first + skip, first + skip + count) into {run_dir}/profile."""

  def __init__(self, profile_steps, run_dir, first):
    self._on = profile_steps is not None
    skip, count = profile_steps or (0, 0)
    self._start, self._stop = first + skip, first + skip + count
    self._dir = fs.join(run_dir, "profile")
    self._tracing = False

  def before_step(self, step):
    if self._on and step == self._start:
      jax.profiler.start_trace(self._dir)
      self._tracing = True
    elif self._tracing and step == self._stop:
      self.stop()

  def stop(self):
    if self._tracing:
      jax.profiler.stop_trace()
      self._tracing = False


def step_flops(plan, latent_shape=None, clips=None) -> float:
  """FLOPs of one train step as MaxDiffusion counts them: 3 x the forward's matmuls (remat
  recomputation not counted), for batches of `latent_shape` (default the plan's largest; a
  packed plan's: rows each one clip of the largest bucket). clips: the latent shapes (F, H, W)
  of a packed batch's clips, each counted as it would run alone with a text_len caption (the
  unpacked batch's work: padding is no work, and clips do not attend to each other)."""
  per_token = plan.conditioning == "first_frame"
  if clips is not None:
    return 3 * sum(flops.flops(plan.model, n, f, h, w, plan.text_len, plan.image_len,
                               per_token_timestep=per_token)
                   for (f, h, w), n in collections.Counter(map(tuple, clips)).items())
  f, h, w, _ = latent_shape or plan.latent_shape
  return 3 * flops.flops(plan.model, plan.global_batch, f, h, w, plan.text_len,
                         plan.image_len, per_token_timestep=per_token)


class Reporter:
  """Reads a step's stats (after the next step is dispatched) and writes its metrics row."""

  def __init__(self, plan, mesh, writer: Writer):
    self._flops = {}  # by latent shape: buckets differ
    self._devices = mesh.devices.size
    self._peak = peak_tflops(mesh.devices.flat[0])
    self._plan, self._writer = plan, writer
    self._last = time.perf_counter()
    self.losses = []
    self.nonfinite = 0  # steps skipped for a non-finite loss, gradient or update
    self._in_a_row = 0

  def restart_clock(self):
    self._last = time.perf_counter()

  def __call__(self, step: int, stats, latent_shape):
    """latent_shape: the unpacked batch's (F, H, W, C); None for a packed batch, whose clips
    come in stats["segment_grid"]."""
    stats = jax.device_get(stats)  # waits for the step to complete
    now = time.perf_counter()
    elapsed, self._last = now - self._last, now
    grids = stats.pop("segment_grid", None)
    finite = bool(stats.pop("finite"))
    self.nonfinite += not finite
    self._in_a_row = 0 if finite else self._in_a_row + 1
    stats["nonfinite_steps"] = self.nonfinite
    if "expert_high" in stats:  # expert=both: the loss under the name of the expert it trained
      expert = "high_noise" if stats.pop("expert_high") else "low_noise"
      stats[f"loss_{expert}"] = stats["loss"]
    self.losses.append(float(stats["loss"]))
    plan = self._plan
    if (step + 1) % plan.outputs.log_every == 0 or step + 1 == plan.num_steps:
      if grids is not None:  # token grids of the clips present -> latent shapes
        clips = grids[grids[..., 0] > 0] * plan.model.patch_size
        flops, samples = step_flops(plan, clips=clips), len(clips)
      else:
        if latent_shape not in self._flops:
          self._flops[latent_shape] = step_flops(plan, latent_shape)
        flops, samples = self._flops[latent_shape], plan.global_batch
      tflops = flops / elapsed / self._devices / 1e12
      self._writer.write(step + 1, {**stats, "step_time": elapsed, "tflops_per_device": tflops,
                                    "mfu": tflops / self._peak if self._peak else None,
                                    "samples_per_second": samples / elapsed})
    if not finite:
      log(f"step {step + 1}: non-finite loss {float(stats['loss']):g} or gradient norm "
          f"{float(stats['grad_norm']):g}: the update was skipped ({self._in_a_row} in a row)")
    if self._in_a_row >= plan.max_nonfinite_steps:
      raise TrainingStopped(
          f"{self._in_a_row} non-finite steps in a row up to step {step + 1} (max_nonfinite_steps="
          f"{plan.max_nonfinite_steps}): every one was skipped, so the parameters and every "
          "checkpoint are the last finite ones. Lower learning_rate (or check the data) and rerun "
          "the same command: it resumes from the newest checkpoint")
