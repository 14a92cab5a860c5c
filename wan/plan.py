"""Validates a training config and derives everything a run needs from it, before any work.

The ConfigDict is read here and nowhere else: `make(c, devices)` checks every field against the
devices, the model family and the checkpoint, and returns a frozen `Plan` (model architecture and
run options, mesh sizes, batch and latent shapes, steps, flow and optimizer settings, output
paths). Everything below the plan takes the Plan's values, never the raw config. `check(c)` runs
the part that needs no devices, so the launcher can refuse a bad config before joining a cluster.

Every error is a `wan.errors.ConfigError` (or `NotImplementedYet`) that says what to change.
"""

import dataclasses
import math
import os

import kernels

from wan import (attention, families, flow, fs, lora, optim, params, plan_data, plan_lora,
                 plan_sample, quant, remat, sharding, transformer, vae)
from wan.data import sources
from wan.weights import roots as weight_roots
from wan.weights import transformer as transformer_weights
from wan.errors import ConfigError, NotImplementedYet
from wan.numerics import DTYPES, PRECISIONS

ENUMS = {
    "model_name": ("wan2.1", "wan2.2"),
    "model_type": ("T2V", "I2V"),
    "expert": ("high_noise", "low_noise", "both"),
    "weights_dtype": tuple(DTYPES),
    "activations_dtype": tuple(DTYPES),
    "precision": tuple(PRECISIONS),
    "attention": transformer.ATTENTIONS,
    "remat_policy": remat.POLICIES,
    "timestep_sampling": flow.SAMPLINGS,
    "lr_schedule": optim.SCHEDULES,
    "hardware": ("tpu", "gpu", "cpu"),
    "dataset_type": ("synthetic", "tfrecord", "hf", "tf", "grain"),
    "job": ("train", "prepare", "generate", "export"),
    "frame_extraction": sources.FRAME_EXTRACTIONS,
}

# Fields of features that later work builds: any value but this one is refused.
NOT_IMPLEMENTED = {
    "replicate_vae": False, "from_pt": True,
}

_REAL_DATA = ("dataset_type=tfrecord, grain, tf or hf (synthetic data has no shuffling or "
              "packing)", lambda c: c.job == "train" and c.dataset_type != "synthetic")
_SOURCES = ("job=prepare or dataset_type=tf / hf (the fields that read and cut clips)",
            plan_data.reads_sources)
_FILES = ("job=prepare or dataset_type=tfrecord, grain or tf",
          lambda c: c.dataset_type != "hf" and (c.job == "prepare" or c.dataset_type != "synthetic"))
_PREPARE = ("job=prepare", lambda c: c.job == "prepare")
_SYNTHETIC = ("dataset_type=synthetic (real data has the sizes of its clips)",
              lambda c: c.job == "train" and c.dataset_type == "synthetic")
_SAVE = ("dataset_type=tf or hf (a cache written while training)",
         lambda c: c.job == "train" and c.dataset_type in ("tf", "hf"))
_TIMESTEP_EVAL = ("timestep_eval=True", lambda c: c.job == "train" and c.timestep_eval)
_EVAL = ("timestep_eval, enable_generate_video_for_eval or enable_ssim",
         lambda c: c.job == "train" and (c.timestep_eval or c.enable_generate_video_for_eval
                                         or c.enable_ssim))
_EVAL_DATA = ("job=prepare, timestep_eval or enable_ssim", lambda c: c.job == "prepare" or (
    c.job == "train" and (c.timestep_eval or c.enable_ssim)))
_PROMPTS = ("job=generate or enable_generate_video_for_eval",
            lambda c: c.job == "generate" or (c.job == "train" and c.enable_generate_video_for_eval))
_SAMPLES = ("job=generate, enable_generate_video_for_eval or enable_ssim",
            lambda c: c.job == "generate" or (c.job == "train" and (
                c.enable_generate_video_for_eval or c.enable_ssim)))
_TRAINING = ("job=train", lambda c: c.job == "train")
_QWIX = ("use_qwix_quantization=True", lambda c: c.use_qwix_quantization)
_LORA = ("enable_lora=True", lambda c: c.enable_lora)
_CHECKPOINTS = ("checkpoint_every > 0", lambda c: c.checkpoint_every > 0)
_CHECKPOINT_DIR = ("checkpoint_every > 0 or job=generate / export (which read the newest one)",
                   lambda c: c.checkpoint_every > 0 or c.job in ("generate", "export"))
_PROFILER = ("enable_profiler=True", lambda c: c.enable_profiler)

# Fields that matter only when another field turns them on: (value when off, (what turns them
# on, test)). A different value with the switch off would be silently ignored, so it is refused.
GATED = {
    "dataset_name": ("", ("dataset_type=hf", lambda c: c.dataset_type == "hf")),
    "train_data_dir": ("", _FILES), "dataset_config": ("", _SOURCES),
    "train_split": ("train", _SOURCES), "load_tfrecord_cached": (True, _REAL_DATA),
    "dataset_save_location": ("", _SAVE), "image_column": ("image", _SOURCES),
    "caption_column": ("text", _SOURCES), "caption_extension": (".txt", _SOURCES),
    "resolution": (0, _SOURCES), "enable_bucket": (False, _SOURCES),
    "bucket_no_upscale": (False, _SOURCES), "frame_extraction": ("head", _SOURCES),
    "frame_stride": (1, _SOURCES), "frame_sample": (1, _SOURCES), "max_frames": (129, _SOURCES),
    "source_fps": (0.0, _SOURCES), "num_repeats": (1, _SOURCES),
    "enable_data_shuffling": (True, _REAL_DATA), "pack_sequences": (False, _REAL_DATA),
    "tfrecords_dir": ("", _PREPARE), "no_records_per_shard": (0, _PREPARE),
    "synthetic_num_samples": (None, _SYNTHETIC),
    **{f"synthetic_override_{n}": (0, _SYNTHETIC)
       for n in ("height", "width", "num_frames", "max_sequence_length")},
    "eval_every": (-1, _EVAL), "eval_data_dir": ("", _EVAL_DATA),
    "timestep_eval": (False, _TRAINING), "enable_generate_video_for_eval": (False, _TRAINING),
    "enable_ssim": (False, _TRAINING),
    "timesteps_list": ((125, 250, 375, 500, 625, 750, 875), _TIMESTEP_EVAL),
    "num_eval_samples": (420, _TIMESTEP_EVAL),
    "eval_max_number_of_samples_in_bucket": (60, _TIMESTEP_EVAL),
    "prompt": ("", _PROMPTS), "prompts_file": ("", _PROMPTS), "image": ("", _PROMPTS),
    "negative_prompt": ("", _SAMPLES), "guidance_scale": (5.0, _SAMPLES),
    "guidance_scale_2": (0.0, _SAMPLES), "num_inference_steps": (50, _SAMPLES),
    "sampler": ("unipc", _SAMPLES), "fps": (0.0, _PROMPTS),
    "lora_config": (dict(rank=(64,), lora_model_name_or_path=(), weight_name=(), adapter_name=(),
                         scale=(1.0,), from_pt=()),
                    _LORA),
    "lora_alpha": (0.0, _LORA), "lora_targets": (lora.DEFAULT_TARGETS, _LORA),
    "enable_lora": (False, ("job=train, generate or export",
                            lambda c: c.job in ("train", "generate", "export"))),
    "export_dir": ("", ("job=export", lambda c: c.job == "export")),
    "learning_rate_low_noise": (0.0, ("expert=both", lambda c: c.expert == "both")),
    "export_merged": (False, ("job=export and enable_lora=True (a LoRA run's merged model)",
                              lambda c: c.job == "export" and c.enable_lora)),
    "quantization": ("", _QWIX), "weight_quantization_calibration_method": ("absmax", _QWIX),
    "act_quantization_calibration_method": ("absmax", _QWIX),
    "bwd_quantization_calibration_method": ("absmax", (
        "use_qwix_quantization=True with quantization=fp8_full (the one mode quantizing the "
        "backward)", lambda c: c.use_qwix_quantization and c.quantization == "fp8_full")),
    "qwix_module_path": (".*", _QWIX),
    "use_qwix_quantization": (False, ("job=train (quantized sampling is not built yet)",
                                      lambda c: c.job == "train")),
    "checkpoint_dir": ("", _CHECKPOINT_DIR), "checkpoints_to_keep": (3, _CHECKPOINTS),
    "save_optimizer": (True, _CHECKPOINTS),
    "enable_single_replica_ckpt_restoring": (False, ("job=train with checkpoint_every > 0",
                                                     lambda c: c.job == "train"
                                                     and c.checkpoint_every > 0)),
    "skip_first_n_steps_for_profiler": (5, _PROFILER), "profiler_steps": (10, _PROFILER),
    "tensorboard_flush_period": (10, ("write_metrics=True", lambda c: c.write_metrics)),
    "names_which_can_be_saved": ((), ("remat_policy=CUSTOM", lambda c: c.remat_policy == "CUSTOM")),
    "names_which_can_be_offloaded": ((), ("remat_policy=CUSTOM",
                                          lambda c: c.remat_policy == "CUSTOM")),
    "logit_mean": (0.0, ("timestep_sampling=logit_normal",
                         lambda c: c.timestep_sampling == "logit_normal")),
    "logit_std": (1.0, ("timestep_sampling=logit_normal",
                        lambda c: c.timestep_sampling == "logit_normal")),
    "num_train_epochs": (1, ("max_train_steps <= 0 (max_train_steps takes priority)",
                             lambda c: c.max_train_steps <= 0)),
    "per_device_batch_size": (1.0, ("global_batch_size <= 0 (global_batch_size wins)",
                                    lambda c: c.global_batch_size <= 0)),
    "flash_block_sizes": ({}, ("attention=flash or ring",
                               lambda c: c.attention in attention.PALLAS)),
    "num_processes": (0, ("coordinator_address", lambda c: bool(c.coordinator_address))),
    "process_id": (-1, ("coordinator_address", lambda c: bool(c.coordinator_address))),
}

# A replicated parameter this large on every device is refused (biases and norms stay below).
MAX_REPLICATED_BYTES = 2**20


@dataclasses.dataclass(frozen=True)
class Devices:
  """What the plan needs to know of the devices: count, hosts, DCN granules, platform and the
  kernels' tuning-table key (None: the kernels ask the process's devices when they trace)."""
  count: int
  processes: int = 1
  granules: int | None = None  # slices or hosts the DCN axes span; default one per process
  platform: str = "cpu"
  kernel: str | None = None

  @classmethod
  def of(cls, devices) -> "Devices":
    devices = list(devices)
    return cls(len(devices), len({d.process_index for d in devices}),
               sharding.granules(devices)[1], devices[0].platform,
               kernels.device_key(devices[0]))


DataSettings = plan_data.DataSettings


@dataclasses.dataclass(frozen=True)
class Outputs:
  """Where a run writes and how often (paths absolute, or bucket URLs)."""
  run_dir: str
  checkpoint_dir: str
  checkpoint_every: int  # samples; -1: no checkpoints
  checkpoints_to_keep: int
  save_optimizer: bool
  single_replica_restore: bool  # enable_single_replica_ckpt_restoring (wan/checkpoint.py)
  write_metrics: bool
  flush_every: int  # steps
  log_every: int  # steps
  profile_steps: tuple[int, int] | None  # (steps skipped after the first, steps traced)
  named_scopes: bool
  jax_cache_dir: str


@dataclasses.dataclass(frozen=True)
class Plan:
  """What a run derives from its config (all sizes global unless named per-process)."""
  family: families.Family
  model: transformer.Config
  options: transformer.Options
  weights: str  # transformer checkpoint (directory or model root); "" = random init
  expert: str
  seed: int
  ici: dict
  dcn: dict
  global_batch: int
  accumulation: int  # micro-batches per step (gradient_accumulation_steps)
  max_nonfinite_steps: int
  latent_shape: tuple  # (F', H', W', C) of the clean latents
  text_len: int
  image_len: int  # CLIP tokens (Wan 2.1 I2V), else 0
  conditioning: str  # wan/conditioning.py kind
  seq_len: int  # transformer tokens per sample
  num_steps: int
  flow: flow.Settings
  optimizer: optim.Settings  # expert=both: the high-noise expert's
  optimizer_low_noise: optim.Settings | None  # expert=both: the low-noise expert's
  data: DataSettings
  outputs: Outputs
  evaluation: plan_sample.Evaluation | None  # in-training evaluation (None: off)
  encoding: plan_data.Encoding | None  # the encoders the eval videos decode and encode with
  boundary: float | None  # Wan 2.2 A14B: the experts' boundary (a sigma)
  lora: lora.Settings | None  # the adapter trained over a frozen base (None: full fine-tune)
  lora_loads: tuple[lora.Load, ...]  # LoRA files: the first starts the adapter, others merged
  param_count: int
  param_bytes: int
  param_bytes_per_device: float
  replicated_bytes: int  # bytes of parameters whole on every device (norms, biases, ...)

  @property
  def mesh_shape(self) -> dict:
    return {a: self.ici[a] * self.dcn[a] for a in sharding.MESH_AXES}

  def summary(self) -> str:
    """A few lines for the start of a run's log."""
    f, h, w, c = self.latent_shape
    both = (f" (both experts, the one of each step's noise level trained; boundary "
            f"{self.boundary:g}, learning rates {self.optimizer.learning_rate:g} / "
            f"{self.optimizer_low_noise.learning_rate:g})" if self.expert == "both" else "")
    return (f"model {self.family.name}{both}, {self.param_count:,} parameters "
            f"({_size(self.param_bytes)}; {_size(self.param_bytes_per_device)} per device, "
            f"{100 * self.replicated_bytes / self.param_bytes:.2g}% of it whole on every "
            f"device), "
            f"{'weights from ' + self.weights if self.weights else 'random init'}"
            + self._lora_summary() + "\n"
            f"mesh {self.mesh_shape}, global batch {self.global_batch}"
            + (f" ({self.accumulation} micro-batches of {self.global_batch // self.accumulation})"
               if self.accumulation > 1 else "") + ", latents "
            f"{f}x{h}x{w}x{c} = {self.seq_len} tokens/sample, {self.num_steps} steps"
            + self._split_summary() + self._data_summary() + self._eval_summary())

  @property
  def split_axes(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(mesh axes the micro-batch splits over, mesh axes each sample's tokens split over), as
    sharding.RULES places the activations (the largest bucket's tokens)."""
    micro = self.global_batch // self.accumulation
    spec = sharding.spec(("batch", "length"), (micro, self.seq_len), self.mesh_shape)
    return sharding.axes_of(spec[0]), sharding.axes_of(spec[1])

  def _split_summary(self) -> str:
    """Where fsdp does not split the batch: whether it splits each sample's tokens."""
    n = self.mesh_shape["fsdp"]
    micro = self.global_batch // self.accumulation
    batch, tokens = self.split_axes
    if n == 1 or "fsdp" in batch:
      return ""
    if "fsdp" in tokens:
      return (f"\nthe batch of {micro} is smaller than data x fsdp: each sample's "
              f"{self.seq_len} tokens split over fsdp {n}")
    return (f"\nfsdp {n} splits neither the batch of {micro} nor the {self.seq_len} tokens of a "
            f"sample: every fsdp device computes every token (activations gathered and "
            f"all-reduced in each layer); use a batch that data x fsdp divides, or videos whose "
            f"token count fsdp divides")

  def _lora_summary(self) -> str:
    r = self.lora
    if r is None:
      return ""
    trained = params.count(lora.declarations(self.model, r))
    return (f"\nLoRA rank {r.rank}, alpha {r.alpha:g} on {len(r.targets)} linear layers per "
            f"block: {trained:,} trained parameters, base frozen" + "".join(f"\n  {'starts from' if i == 0 else 'merged:'} "
                                           f"{x.path} (scale {x.scale:g})"
                                           for i, x in enumerate(self.lora_loads)))

  def _eval_summary(self) -> str:
    e = self.evaluation
    if e is None:
      return ""
    parts = ([f"loss at timesteps {','.join(map(str, e.timesteps))}"] if e.timesteps else []) \
        + (["sample videos"] if e.videos else []) + (["SSIM"] if e.ssim else [])
    return f"\neval every {e.every} steps: {', '.join(parts)}"

  def _data_summary(self) -> str:
    d = self.data
    if d.kind == "synthetic":
      return ""
    where = d.cache if d.kind in ("tfrecord", "grain") else "clips encoded on the fly"
    buckets = ", ".join("x".join(map(str, s[:3])) for s in d.buckets)
    line = (f"\ndata {d.kind} ({where}): {len(d.buckets)} buckets ({buckets}), "
            f"{d.steps_per_epoch} steps per epoch")
    if d.packing:
      r = d.packing
      line += (f", packed: rows of {r.seq_len} tokens holding up to {r.max_segments} clips "
               f"({r.text_len} caption tokens)")
    skipped = (d.manifest or {}).get("skipped") or ()
    if skipped and d.kind in ("tf", "hf"):
      line += f"; {len(skipped)} files skipped:" + "".join(
          f"\n  {path}: {reason}" for path, reason in skipped)
    return line


def _size(nbytes: float) -> str:
  for unit in ("B", "KiB", "MiB", "GiB"):
    if nbytes < 1024 or unit == "GiB":
      return f"{nbytes:.3g} {unit}" if unit != "B" else f"{int(nbytes)} B"
    nbytes /= 1024


def _fail(message):
  raise ConfigError(message)


def _divisors(n):
  return [d for d in range(1, n + 1) if n % d == 0]


def _listing(values) -> str:
  values = [str(v) for v in values]
  return values[0] if len(values) == 1 else ", ".join(values[:-1]) + " or " + values[-1]


def names(value) -> tuple[str, ...]:
  """A tuple-of-strings field from the command line: `a,b` arrives as ("a,b",) and is split."""
  if isinstance(value, str):
    value = (value,)
  return tuple(n.strip() for item in value for n in str(item).split(",") if n.strip())


def _plain(value):
  """Config values in comparable form (ConfigDicts as dicts, lists as tuples)."""
  if hasattr(value, "to_dict"):
    value = value.to_dict()
  if isinstance(value, dict):
    return {k: _plain(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return tuple(_plain(v) for v in value)
  return value


# ----------------------------------------------------------------------------------------------
# Checks that need no devices.


def check(c):
  """Everything about `c` that needs neither devices nor files; raises ConfigError."""
  for field, allowed in ENUMS.items():
    if c[field] not in allowed:
      _fail(f"{field}={c[field]!r} is not one of {list(allowed)}")
  for field, default in NOT_IMPLEMENTED.items():
    if c[field] != default:
      raise NotImplementedYet(f"{field}={c[field]!r} is not implemented yet; leave it at "
                              f"{default!r}")
  for field, (off, (switch, on)) in GATED.items():
    value = _plain(c[field])
    if field in ("names_which_can_be_saved", "names_which_can_be_offloaded"):
      value = names(value)
    if value != _plain(off) and not on(c):
      _fail(f"{field}={value!r} has no effect unless {switch}; leave it at {_plain(off)!r}")
  if names(c.mesh_axes) != sharding.MESH_AXES:
    _fail(f"mesh_axes must be {','.join(sharding.MESH_AXES)}; got {','.join(names(c.mesh_axes))}")
  remat_names = names(c.names_which_can_be_saved) + names(c.names_which_can_be_offloaded)
  try:
    remat.check_names(remat_names)
  except ValueError as e:
    _fail(str(e))
  if kernels.RESIDUALS in remat_names and c.attention not in attention.PALLAS:
    _fail(f"{kernels.RESIDUALS} names the flash and ring kernels' residuals; attention="
          f"{c.attention} has none: use attention=flash or ring, or save attn_output")
  _check_ranges(c)


def _check_ranges(c):
  rules = [
      ("learning_rate", c.learning_rate > 0, "> 0"),
      ("gradient_accumulation_steps", c.gradient_accumulation_steps >= 1, ">= 1"),
      ("max_nonfinite_steps", c.max_nonfinite_steps >= 1, ">= 1"),
      ("learning_rate_low_noise", c.learning_rate_low_noise >= 0,
       ">= 0 (0: learning_rate)"),
      ("adam_b1", 0 <= c.adam_b1 < 1, "in [0, 1)"),
      ("adam_b2", 0 <= c.adam_b2 < 1, "in [0, 1)"),
      ("adam_eps", c.adam_eps > 0, "> 0"),
      ("adam_weight_decay", c.adam_weight_decay >= 0, ">= 0"),
      ("warmup_steps_fraction", 0 <= c.warmup_steps_fraction <= 1, "in [0, 1]"),
      ("learning_rate_schedule_steps", c.learning_rate_schedule_steps == -1
       or c.learning_rate_schedule_steps >= 1, "-1 (the number of steps) or >= 1"),
      ("num_train_epochs", c.num_train_epochs >= 1, ">= 1"),
      ("per_device_batch_size", c.per_device_batch_size > 0, "> 0"),
      ("global_batch_size", c.global_batch_size >= 0, ">= 0 (0: per_device_batch_size)"),
      ("flow_shift", c.flow_shift > 0, "> 0 (1 = no shift)"),
      ("logit_std", c.logit_std > 0, "> 0"),
      ("caption_dropout", 0 <= c.caption_dropout < 1, "in [0, 1)"),
      ("dropout", 0 <= c.dropout < 1, "in [0, 1)"),
      ("boundary", 0 <= c.boundary < 1, "in (0, 1), or 0 for the model's own"),
      ("height", c.height > 0, "> 0"), ("width", c.width > 0, "> 0"),
      ("num_frames", c.num_frames > 0, "> 0"),
      ("max_sequence_length", c.max_sequence_length >= 1, ">= 1"),
      ("synthetic_num_samples", c.synthetic_num_samples is None or c.synthetic_num_samples >= 1,
       ">= 1, or None for an infinite stream"),
      ("checkpoint_every", c.checkpoint_every == -1 or c.checkpoint_every > 0,
       "-1 (no checkpoints) or > 0 samples"),
      ("checkpoints_to_keep", c.checkpoints_to_keep >= 1, ">= 1"),
      ("log_every", c.log_every >= 1, ">= 1"),
      ("tensorboard_flush_period", c.tensorboard_flush_period >= 1, ">= 1"),
      ("skip_first_n_steps_for_profiler", c.skip_first_n_steps_for_profiler >= 0, ">= 0"),
      ("profiler_steps", c.profiler_steps >= 1, ">= 1"),
      ("seed", c.seed >= 0, ">= 0"),
      ("flash_min_seq_length", c.flash_min_seq_length >= 0, ">= 0"),
  ]
  rules += [(f"synthetic_override_{n}", c[f"synthetic_override_{n}"] >= 0, ">= 0 (0: no override)")
            for n in ("height", "width", "num_frames", "max_sequence_length")]
  for field, ok, what in rules:
    if not ok:
      _fail(f"{field}={c[field]!r} must be {what}")
  if not c.run_name or "/" in c.run_name:
    _fail(f"run_name={c.run_name!r} must be a non-empty name without '/'")
  if c.coordinator_address and (c.num_processes < 1 or not 0 <= c.process_id < c.num_processes):
    _fail(f"coordinator_address needs num_processes >= 1 and 0 <= process_id < num_processes; "
          f"got num_processes={c.num_processes}, process_id={c.process_id}")


# ----------------------------------------------------------------------------------------------
# The model: family, architecture, options.


def _family(c) -> families.Family:
  if c.model_preset not in transformer.PRESETS:
    _fail(f"model_preset={c.model_preset!r} is not one of {sorted(transformer.PRESETS)}")
  family = families.FAMILIES[families.PRESET_FAMILIES[c.model_preset]]
  if c.model_name != family.model_name:
    _fail(f"model_name={c.model_name} does not match model_preset={c.model_preset}, a "
          f"{family.model_name} model ({family.name}); set model_name={family.model_name} or use "
          f"a {c.model_name} config")
  if c.model_type not in family.model_types:
    kind = "an image-to-video" if c.model_type == "I2V" else "a text-to-video"
    _fail(f"model_type={c.model_type} needs {kind} model, and model_preset={c.model_preset} "
          f"({family.name}) is {'/'.join(family.model_types)} only; set "
          f"model_type={family.model_types[0]} or use a {c.model_type} config")
  if not family.experts:
    if c.expert != "high_noise":  # low_noise or both
      _fail(f"expert={c.expert} applies only to the two-expert Wan 2.2 A14B models "
            f"(configs/wan22_t2v.py, configs/wan22_i2v.py); {family.name} has one")
    if c.boundary:
      _fail(f"boundary={c.boundary} applies only to the two-expert Wan 2.2 A14B models; "
            f"{family.name} has one; leave it at 0")
  return family


def _architecture(c, family, weights_path: str, latent_channels: int):
  """(architecture, boundary): the checkpoint's when there is one (else the preset's), checked
  against the family."""
  boundary = family.boundary
  if weights_path:
    arch = transformer.Config.from_diffusers(
        transformer_weights.read_architecture(  # both experts have one architecture
            weights_path, "high_noise" if c.expert == "both" else c.expert))
    index = weight_roots.model_index(weights_path)
    if index is not None:
      ratio = index.get("boundary_ratio")
      if (ratio is not None) != family.experts:
        _fail(f"{weights_path}: model_index.json "
              f"{'has' if ratio is not None else 'has no'} boundary_ratio (a "
              f"{'two' if ratio is not None else 'one'}-expert model), but model_preset="
              f"{c.model_preset} is {family.name}; use a config of the checkpoint's family")
      boundary = ratio if ratio is not None else boundary
    source = f"the checkpoint at {weights_path}"
  else:
    arch, source = transformer.PRESETS[c.model_preset], f"model_preset={c.model_preset}"
  problems = families.architecture_problems(family, arch, latent_channels)
  if problems:
    _fail(f"{source} does not fit the {family.name} family of model_preset={c.model_preset} "
          f"({'; '.join(problems)}); use the config of the checkpoint's model family")
  return arch, (c.boundary or boundary)


def _quantization(c, model) -> quant.Settings | None:
  if not c.use_qwix_quantization:
    return None
  if c.quantization not in quant.MODES:
    _fail(f"use_qwix_quantization=True needs quantization = {_listing(quant.MODES)}; got "
          f"{c.quantization!r}")
  try:
    return quant.Settings(c.quantization, c.weight_quantization_calibration_method,
                          c.act_quantization_calibration_method,
                          c.bwd_quantization_calibration_method,
                          quant.targets(transformer.declarations(model), c.qwix_module_path))
  except ValueError as e:
    _fail(str(e))


def _options(c, model, devices: Devices) -> transformer.Options:
  policy = c.remat_policy
  if policy == "AUTO" and c.job != "train":  # remat only shapes a backward pass
    policy = "NONE"
  try:
    return transformer.Options(
        weights_dtype=c.weights_dtype, activations_dtype=c.activations_dtype,
        precision=c.precision, attention=c.attention,
        flash_min_seq_length=c.flash_min_seq_length,
        flash_block_sizes=tuple(sorted(c.flash_block_sizes.items())) or None,
        split_head_dim=c.split_head_dim, attention_sharding_uniform=c.attention_sharding_uniform,
        mask_padding_tokens=c.mask_padding_tokens, scan_layers=c.scan_layers,
        remat_policy=policy, names_which_can_be_saved=names(c.names_which_can_be_saved),
        names_which_can_be_offloaded=names(c.names_which_can_be_offloaded), dropout=c.dropout,
        quantization=_quantization(c, model), kernel_target=devices.kernel)
  except ValueError as e:
    _fail(str(e))


# ----------------------------------------------------------------------------------------------
# Shapes, mesh and batch.


def _latent_shape(c, model, vae_cfg):
  spatial, temporal = vae_cfg.scale_factor_spatial, vae_cfg.scale_factor_temporal
  height = c.synthetic_override_height or c.height
  width = c.synthetic_override_width or c.width
  frames = c.synthetic_override_num_frames or c.num_frames
  if (frames - 1) % temporal:
    k = (frames - 1) // temporal
    _fail(f"num_frames={frames} must be {temporal}k+1 (the VAE compresses time {temporal}x after "
          f"the first frame); use {temporal * k + 1} or {temporal * k + temporal + 1}")
  _, ph, pw = model.patch_size
  for name, size, patch in (("height", height, ph), ("width", width, pw)):
    factor = spatial * patch
    if size % factor:
      _fail(f"{name}={size} must be divisible by {factor} (VAE {spatial}x times patch {patch}); "
            f"use {size // factor * factor or factor} or {(size // factor + 1) * factor}")
  return ((frames - 1) // temporal + 1, height // spatial, width // spatial, vae_cfg.z_dim)


def _check_tokens(latent_shape, model, context: int, device_count: int):
  """A latent shape the transformer and the context axis can take."""
  pt, ph, pw = model.patch_size
  f, h, w = latent_shape[:3]
  if f % pt or h % ph or w % pw:
    _fail(f"latents {f}x{h}x{w} do not split into {pt}x{ph}x{pw} patches; prepare the data "
          "with this model's config")
  grid = (f // pt, h // ph, w // pw)
  if max(grid) > model.rope_max_seq_len:
    _fail(f"latents {f}x{h}x{w} give {max(grid)} positions on one axis, more than the model's "
          f"rope_max_seq_len={model.rope_max_seq_len}; use smaller clips")
  seq_len = grid[0] * grid[1] * grid[2]
  if seq_len % context:
    _fail(f"context parallelism {context} does not divide the {seq_len} video tokens of "
          f"{latent_shape[:3]} latents; use one of "
          f"{[d for d in _divisors(seq_len) if d <= device_count]}")


def _mesh(c, devices: Devices):
  axes = sharding.MESH_AXES
  try:
    return sharding.mesh_shape({a: c[f"ici_{a}"] for a in axes}, {a: c[f"dcn_{a}"] for a in axes},
                               devices.count, devices.granules or devices.processes)
  except ValueError as e:
    _fail(str(e))


def _batch(c, devices: Devices, mesh_shape):
  if c.global_batch_size > 0:
    global_batch = int(c.global_batch_size)
  else:
    exact = c.per_device_batch_size * devices.count
    if abs(exact - round(exact)) > 1e-9 or round(exact) < 1:
      _fail(f"per_device_batch_size={c.per_device_batch_size} x {devices.count} devices = "
            f"{exact:g} is not a whole global batch; use a multiple of 1/{devices.count} or set "
            "global_batch_size")
    global_batch = round(exact)
  if global_batch % mesh_shape["data"]:
    _fail(f"global batch {global_batch} does not split over data parallelism "
          f"{mesh_shape['data']}; use a global batch that is a multiple of {mesh_shape['data']}")
  if global_batch % devices.processes:
    _fail(f"global batch {global_batch} does not split over {devices.processes} hosts; use a "
          f"multiple of {devices.processes}")
  return global_batch


def _accumulation(c, global_batch, mesh_shape) -> int:
  k = int(c.gradient_accumulation_steps)
  if k == 1:
    return 1
  if c.pack_sequences:
    _fail("gradient_accumulation_steps > 1 with pack_sequences=True is not supported (a packed "
          "batch's loss is a mean over its clips, which micro-batches would weigh unevenly); "
          "set one of them back")
  micro = global_batch // k
  if global_batch % k or micro % mesh_shape["data"]:
    fits = [d for d in _divisors(global_batch) if (global_batch // d) % mesh_shape["data"] == 0]
    _fail(f"gradient_accumulation_steps={k} does not split the global batch {global_batch} into "
          f"equal micro-batches that split over data parallelism {mesh_shape['data']}; use "
          f"{_listing(fits)}")
  return k


def _num_steps(c, global_batch, data, patch_size):
  if c.max_train_steps > 0:
    return int(c.max_train_steps)
  if data.pack and data.shuffle:  # each epoch packs its own order: its own number of rows
    return sum(plan_data.packed_steps(data, patch_size, global_batch, int(c.seed), e)
               for e in range(int(c.num_train_epochs)))
  if data.steps_per_epoch:
    return int(c.num_train_epochs) * data.steps_per_epoch
  if c.synthetic_num_samples:
    return int(c.num_train_epochs) * math.ceil(c.synthetic_num_samples / global_batch)
  _fail("max_train_steps <= 0 and the data set is infinite: set max_train_steps, or "
        "synthetic_num_samples with num_train_epochs")


def _check_packing(c, model):
  """pack_sequences=True: an attention and a model that keep packed clips apart."""
  if c.attention == "cudnn_flash_te":
    _fail("pack_sequences=True needs an attention that separates packed clips by segment ids; "
          "attention=cudnn_flash_te masks by key lengths only: use flash, ring or dot_product")
  if model.pos_embed_seq_len is not None:
    _fail("pack_sequences=True does not support the FLF2V image position embedding "
          "(pos_embed_seq_len); set pack_sequences=False")


def _place_parameters(decls, mesh_shape, dtype) -> tuple[float, int]:
  """Refuses large parameters that the mesh would leave whole on every device (against the rule
  table); returns (parameter bytes per device, bytes of parameters whole on every device)."""
  placed = params.placements(decls, mesh_shape, dtype)
  large = [r for r in placed if r.unplaced and r.nbytes > MAX_REPLICATED_BYTES]
  if large:
    r = large[0]
    pool = mesh_shape["data"] * mesh_shape["fsdp"]  # devices that data and fsdp share
    works = [f for f in _divisors(pool)
             if not any(x.unplaced and x.nbytes > MAX_REPLICATED_BYTES for x in params.placements(
                 decls, dict(mesh_shape, data=pool // f, fsdp=f), dtype))]
    sizes = " x ".join(f"{a}={mesh_shape[a]}" for a in r.unplaced)
    more = f" (and {len(large) - 1} more)" if len(large) > 1 else ""
    fix = (f"use fsdp = {_listing(works)} (ici_fsdp x dcn_fsdp), giving the other devices to "
           "data parallelism" if works and "fsdp" in r.unplaced else "change the mesh sizes")
    _fail(f"{len(large)} parameter(s) would be whole on every device: {r.path} {r.shape} "
          f"({_size(r.nbytes)}) has no dimension that {sizes} divides{more}; {fix}")
  per_device = sum(r.per_device_bytes(mesh_shape) for r in placed)
  whole = sum(r.nbytes for r in placed if not any(r.spec)) if math.prod(
      mesh_shape.values()) > mesh_shape["data"] else 0  # pure data parallelism: by design
  return per_device, whole


# ----------------------------------------------------------------------------------------------
# The plan.


def _outputs(c) -> Outputs:
  output_dir = fs.absolute(c.output_dir)
  run_dir = fs.join(output_dir, c.run_name)
  checkpoint_dir = fs.absolute(c.checkpoint_dir) or fs.join(run_dir, "checkpoints")
  for field, path in (("output_dir", run_dir), ("checkpoint_dir", checkpoint_dir)):
    _check_writable(field, path)
  if c.write_metrics and c.gcs_metrics != fs.is_remote(output_dir):
    _fail(f"gcs_metrics={c.gcs_metrics} but output_dir={c.output_dir!r} is "
          f"{'a bucket' if fs.is_remote(output_dir) else 'local'}; metrics are written under "
          f"output_dir, so set gcs_metrics={fs.is_remote(output_dir)}")
  return Outputs(
      run_dir=run_dir, checkpoint_dir=checkpoint_dir, checkpoint_every=int(c.checkpoint_every),
      checkpoints_to_keep=int(c.checkpoints_to_keep), save_optimizer=c.save_optimizer,
      single_replica_restore=bool(c.enable_single_replica_ckpt_restoring),
      write_metrics=c.write_metrics, flush_every=int(c.tensorboard_flush_period),
      log_every=int(c.log_every),
      profile_steps=((int(c.skip_first_n_steps_for_profiler), int(c.profiler_steps))
                     if c.enable_profiler else None),
      named_scopes=c.enable_jax_named_scopes, jax_cache_dir=fs.absolute(c.jax_cache_dir))


def _check_writable(field, path):
  """A local directory that exists and is writable, or can be created under one that is."""
  if fs.is_remote(path):
    return
  existing = path
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
    _fail(f"{field}: {path} cannot be written ({existing} is "
          f"{'not a directory' if not os.path.isdir(existing) else 'not writable'}); choose "
          f"another {field}")


def _lora(c, model) -> tuple[lora.Settings | None, tuple[lora.Load, ...]]:
  """(the adapter a run trains or its checkpoint holds, the LoRA files to load)."""
  lc = c.lora_config
  loads = plan_lora.loads(names(lc.lora_model_name_or_path), names(lc.weight_name),
                          names(lc.adapter_name), tuple(lc.scale), tuple(lc.from_pt),
                          tuple(lc.rank))
  return plan_lora.settings(c, model), loads


def preparation(c) -> plan_data.Preparation:
  """Validates a job=prepare config and returns what it reads and writes (nothing is written)."""
  check(c)
  family = _family(c)
  weights_path = fs.absolute(c.transformer_pretrained_model_name_or_path
                            or c.pretrained_model_name_or_path)
  model, _ = _architecture(c, family, weights_path, vae.PRESETS[family.vae].z_dim)
  _latent_shape(c, model, vae.PRESETS[family.vae])  # num_frames 4k+1, sizes in whole patches
  return plan_data.preparation(c, family, model)


def _check_hardware(c, devices: Devices):
  if c.hardware != devices.platform:
    _fail(f"hardware={c.hardware} but the devices are {devices.platform}; set "
          f"hardware={devices.platform}" + (" (or JAX_PLATFORMS=cpu)" if c.hardware == "cpu"
                                            else ""))
  if c.attention == "cudnn_flash_te" and devices.platform != "gpu":
    _fail(f"attention=cudnn_flash_te runs cuDNN flash attention on NVIDIA GPUs; these devices "
          f"are {devices.platform}: use attention=flash (or ring, dot_product)")


def _model_and_mesh(c, devices: Devices, job: str):
  """What training and generation (`job`) both check first: the config alone, the devices, the
  model family and the checkpoint's architecture, the mesh and the heads it splits.
  Returns (family, vae_cfg, weights_path, model, boundary, ici, dcn)."""
  check(c)
  if c.job != job:
    _fail(f"job={c.job} has no {job} plan; the launcher runs each job with its own "
          "(plan.make, plan.preparation, plan.generation)")
  _check_hardware(c, devices)
  family = _family(c)
  vae_cfg = vae.PRESETS[family.vae]
  weights_path = fs.absolute(c.transformer_pretrained_model_name_or_path
                            or c.pretrained_model_name_or_path)
  model, boundary = _architecture(c, family, weights_path, vae_cfg.z_dim)
  ici, dcn = _mesh(c, devices)
  heads, tensor = model.num_attention_heads, ici["tensor"] * dcn["tensor"]
  if heads % tensor:
    _fail(f"tensor parallelism {tensor} does not divide {heads} heads; use "
          f"{_listing(_divisors(heads))}")
  return family, vae_cfg, weights_path, model, boundary, ici, dcn


def make(c, devices) -> Plan:
  """Validates `c` for `devices` (a Devices, or jax devices) and returns the run's Plan
  (nothing is built or written)."""
  if not isinstance(devices, Devices):
    devices = Devices.of(devices)
  family, vae_cfg, weights_path, model, boundary, ici, dcn = _model_and_mesh(c, devices, "train")
  options = _options(c, model, devices)
  mesh_shape = {a: ici[a] * dcn[a] for a in sharding.MESH_AXES}
  latent_shape = _latent_shape(c, model, vae_cfg)
  global_batch = _batch(c, devices, mesh_shape)
  accumulation = _accumulation(c, global_batch, mesh_shape)
  if c.dataset_type == "synthetic":
    data = DataSettings(c.dataset_type, c.synthetic_num_samples, buckets=(latent_shape,))
  else:
    data = plan_data.stream(c, family, model, global_batch)
  for shape in data.buckets:
    _check_tokens(shape, model, mesh_shape["context"], devices.count)
  if family.conditioning(c.model_type) == "first_frame" and any(s[0] == 1 for s in data.buckets):
    _fail("model_type=I2V of TI2V 5B learns the frames after the clean first one, and the data "
          "has one-frame clips (images): leave the images out, or train model_type=T2V")
  pt, ph, pw = model.patch_size
  tokens = lambda s: (s[0] // pt) * (s[1] // ph) * (s[2] // pw)
  latent_shape = max(data.buckets, key=tokens)  # the largest batch: memory and FLOPs
  seq_len = tokens(latent_shape)
  if kernels.RESIDUALS in options.names_which_can_be_saved and not attention.runs_kernel(
      c.attention, seq_len, c.flash_min_seq_length):
    _fail(f"{kernels.RESIDUALS}: the videos' {seq_len} tokens are fewer than flash_min_seq_length"
          f"={c.flash_min_seq_length}, so attention runs without the kernels and has no residuals "
          "to save; lower flash_min_seq_length or save attn_output")
  if data.pack:
    _check_packing(c, model)
    data = plan_data.packed(data, model.patch_size, seq_len, int(c.max_sequence_length),
                            family.image_tokens, c.mask_padding_tokens, global_batch, int(c.seed))
  if not c.attention_sharding_uniform and mesh_shape["context"] == 1:
    _fail("attention_sharding_uniform=False has no effect without context parallelism "
          "(ici_context or dcn_context > 1); leave it at True")
  num_steps = _num_steps(c, global_batch, data, model.patch_size)
  decls = transformer.declarations(model)
  per_device, whole = _place_parameters(decls, mesh_shape, DTYPES[c.weights_dtype])
  schedule_steps = (num_steps if c.learning_rate_schedule_steps < 0
                    else int(c.learning_rate_schedule_steps))
  if boundary is None or c.expert == "both":  # both: each step draws its expert's side
    sigma_range = (0.0, 1.0)
  else:
    sigma_range = (boundary, 1.0) if c.expert == "high_noise" else (0.0, boundary)
  experts = 2 if c.expert == "both" else 1
  evaluation = plan_sample.evaluation(c, family, model, vae_cfg, sigma_range)
  lora_settings, lora_loads = _lora(c, model)
  optimizer = optim.Settings(
      learning_rate=c.learning_rate * (global_batch if c.scale_lr else 1),
      schedule=c.lr_schedule, warmup_steps=int(c.warmup_steps_fraction * schedule_steps),
      schedule_steps=schedule_steps, b1=c.adam_b1, b2=c.adam_b2, eps=c.adam_eps,
      weight_decay=c.adam_weight_decay, max_grad_norm=c.max_grad_norm)
  encoding = None
  if evaluation is not None and (evaluation.videos or evaluation.ssim):
    encoding = data.encoding or plan_data.encoders(c, family, model)
  return Plan(
      family=family, model=model, options=options, weights=weights_path, expert=c.expert,
      seed=int(c.seed), ici=ici, dcn=dcn, global_batch=global_batch, accumulation=accumulation,
      max_nonfinite_steps=int(c.max_nonfinite_steps), latent_shape=latent_shape,
      text_len=c.synthetic_override_max_sequence_length or c.max_sequence_length,
      image_len=family.image_tokens, conditioning=family.conditioning(c.model_type),
      seq_len=seq_len, num_steps=num_steps,
      flow=flow.Settings(sampling=c.timestep_sampling, logit_mean=c.logit_mean,
                         logit_std=c.logit_std, shift=c.flow_shift, sigma_range=sigma_range,
                         bell_weighting=not c.disable_training_weights,
                         caption_dropout=c.caption_dropout),
      optimizer=optimizer,
      optimizer_low_noise=(dataclasses.replace(optimizer, learning_rate=(
          c.learning_rate_low_noise or c.learning_rate) * (global_batch if c.scale_lr else 1))
                           if c.expert == "both" else None),
      data=data,
      outputs=_outputs(c),
      evaluation=evaluation, encoding=encoding, boundary=boundary, lora=lora_settings,
      lora_loads=lora_loads, param_count=experts * params.count(decls),
      param_bytes=experts * params.nbytes(decls, DTYPES[c.weights_dtype]),
      param_bytes_per_device=experts * per_device, replicated_bytes=experts * whole)


@dataclasses.dataclass(frozen=True)
class Generation:
  """A job=generate run: the model, the mesh it is sharded over, the sampling settings, where the
  videos go and where a training run's checkpoint may be."""
  family: families.Family
  model: transformer.Config
  options: transformer.Options
  root: str  # pretrained_model_name_or_path ("" for the tiny configs' random weights)
  weights: str  # the transformer checkpoint directory or root ("" = random init from seed)
  expert: str  # the expert a training checkpoint holds (Wan 2.2 A14B)
  boundary: float | None
  ici: dict
  dcn: dict
  encoding: plan_data.Encoding
  sampling: plan_sample.Sampling
  checkpoint_dir: str  # its newest checkpoint's parameters replace the weights, if it holds one
  lora: lora.Settings | None  # enable_lora: the adapter a LoRA run's checkpoint holds
  lora_loads: tuple[lora.Load, ...]  # LoRA files merged into the weights
  samples_dir: str
  jax_cache_dir: str

  def summary(self) -> str:
    s = self.sampling
    return (f"generate with {self.family.name} ({self.weights or 'random init'}): "
            f"{len(s.prompts)} prompt(s), {s.num_frames}x{s.height}x{s.width} at {s.fps:g} fps, "
            f"{s.sampler} {s.num_inference_steps} steps, shift {s.flow_shift:g}, guidance "
            f"{s.guidance_scale:g}" + (f" / {s.guidance_scale_2:g}" if s.guidance_scale_2 else "")
            + f"\nvideos to {self.samples_dir}")


def generation(c, devices) -> Generation:
  """Validates a job=generate config for `devices` and returns what it runs (nothing is read
  but config files and headers)."""
  if not isinstance(devices, Devices):
    devices = Devices.of(devices)
  family, vae_cfg, weights_path, model, boundary, ici, dcn = _model_and_mesh(c, devices,
                                                                            "generate")
  sampling = plan_sample.sampling(c, family, model, vae_cfg, prompts_required=True)
  if plan_sample.needs_image(family, c.model_type) and not sampling.image:
    _fail(f"{family.name} generates image-to-video: set image to the conditioning image")
  shape = _latent_shape(c, model, vae_cfg)
  _check_tokens(shape, model, ici["context"] * dcn["context"], devices.count)
  out = _outputs(c)
  lora_settings, lora_loads = _lora(c, model)
  return Generation(family=family, model=model, options=_options(c, model, devices),
                    root=fs.absolute(c.pretrained_model_name_or_path), weights=weights_path,
                    expert=c.expert, boundary=boundary, ici=ici, dcn=dcn,
                    encoding=plan_data.encoders(c, family, model), sampling=sampling,
                    checkpoint_dir=out.checkpoint_dir, lora=lora_settings,
                    lora_loads=lora_loads, samples_dir=fs.join(out.run_dir, "samples"),
                    jax_cache_dir=out.jax_cache_dir)


@dataclasses.dataclass(frozen=True)
class Export:
  """A job=export run: a training run's newest checkpoint as a diffusers model root."""
  family: families.Family
  model: transformer.Config
  options: transformer.Options
  root: str  # the base model root whose other components are copied ("" = none)
  weights: str  # the base transformer (a LoRA run's frozen base; "" = random init from seed)
  expert: str  # the expert the run trained (Wan 2.2 A14B)
  seed: int
  ici: dict
  dcn: dict
  checkpoint_dir: str
  export_dir: str
  merged: bool  # a LoRA run: also the transformer with the adapters merged
  lora: lora.Settings | None
  lora_loads: tuple[lora.Load, ...]

  def summary(self) -> str:
    what = ("LoRA files" + (" and the merged transformer" if self.merged else "")
            if self.lora else "the transformer")
    rest = (f", the other components from {self.root}" if self.root else
            " (no pretrained_model_name_or_path root: no other components)")
    return (f"export {self.family.name} from {self.checkpoint_dir}: {what}{rest}\n"
            f"to {self.export_dir}")


def export(c, devices) -> Export:
  """Validates a job=export config for `devices` and returns what it writes (nothing is read
  but config files and headers)."""
  if not isinstance(devices, Devices):
    devices = Devices.of(devices)
  family, _, weights_path, model, _, ici, dcn = _model_and_mesh(c, devices, "export")
  if not c.export_dir:
    _fail("job=export writes a model root to export_dir: set export_dir")
  export_dir = fs.absolute(c.export_dir)
  if fs.exists(export_dir) and (not fs.isdir(export_dir) or fs.listdir(export_dir)):
    _fail(f"export_dir {export_dir} already exists and is not empty; choose a new directory "
          "(an export never overwrites files)")
  _check_writable("export_dir", export_dir)
  root = fs.absolute(c.pretrained_model_name_or_path)
  if root and weight_roots.model_index(root) is None:
    _fail(f"pretrained_model_name_or_path={root} is not a diffusers model root "
          "(model_index.json): export copies its other components; use the diffusers root")
  lora_settings, lora_loads = _lora(c, model)
  return Export(family=family, model=model, options=_options(c, model, devices), root=root,
                weights=weights_path, expert=c.expert, seed=int(c.seed), ici=ici, dcn=dcn,
                checkpoint_dir=_outputs(c).checkpoint_dir, export_dir=export_dir,
                merged=bool(c.export_merged), lora=lora_settings, lora_loads=lora_loads)
