"""Validates a training config and derives everything a run needs from it, before any work.

`plan(c, num_devices, num_processes)` checks every field against the devices that exist and
returns a `Plan`: the model config, mesh sizes, batch sizes, latent shapes and step counts. Every
error says what to change.
"""

import dataclasses
import math

from wan import remat, sharding
from wan import transformer
from wan import transformer_checkpoint

ENUMS = {
    "model_name": ("wan2.1", "wan2.2"),
    "model_type": ("T2V", "I2V"),
    "expert": ("high_noise", "low_noise"),
    "weights_dtype": tuple(transformer.DTYPES),
    "activations_dtype": tuple(transformer.DTYPES),
    "precision": tuple(transformer.PRECISIONS),
    "attention": transformer.ATTENTIONS,
    "remat_policy": remat.POLICIES,
    "timestep_sampling": ("uniform", "logit_normal"),
    "lr_schedule": ("constant", "linear", "cosine"),
    "hardware": ("tpu", "gpu", "cpu"),
    "dataset_type": ("synthetic", "tfrecord", "hf", "tf", "grain"),
}

# Fields of features that later work builds: they must keep these values for now.
NOT_IMPLEMENTED = {
    "eval_every": -1, "eval_data_dir": "", "enable_generate_video_for_eval": False,
    "timestep_eval": False, "enable_ssim": False, "enable_lora": False, "quantization": "",
    "use_qwix_quantization": False, "tfrecords_dir": "", "no_records_per_shard": 0,
    "enable_single_replica_ckpt_restoring": False, "replicate_vae": False, "prompt": "",
    "from_pt": True,
}
NOT_IMPLEMENTED_DATASETS = ("tfrecord", "hf", "tf", "grain")


@dataclasses.dataclass(frozen=True)
class Plan:
  """What a run derives from its config (all sizes global unless named per-process)."""
  model: transformer.Config
  ici: dict
  dcn: dict
  global_batch: int
  latent_shape: tuple  # (F', H', W', C) of the clean latents
  text_len: int
  image_len: int  # CLIP tokens (Wan 2.1 I2V), else 0
  conditioning: str  # none | concat (36-channel I2V) | first_frame (TI2V 5B I2V)
  seq_len: int  # transformer tokens per sample
  num_steps: int
  schedule_steps: int
  warmup_steps: int
  learning_rate: float
  sigma_range: tuple  # (low, high) of sigma for this run (A14B experts split it)


def _divisors(n):
  return [d for d in range(1, n + 1) if n % d == 0]


def _check_enums_and_pending(c):
  for field, allowed in ENUMS.items():
    if c[field] not in allowed:
      raise ValueError(f"{field}={c[field]!r} is not one of {list(allowed)}")
  for field, default in NOT_IMPLEMENTED.items():
    if c[field] != default:
      raise NotImplementedError(f"{field}={c[field]!r} is not implemented yet; leave it at "
                                f"{default!r}")
  if c.dataset_type in NOT_IMPLEMENTED_DATASETS:
    raise NotImplementedError(f"dataset_type={c.dataset_type!r} is not implemented yet; use "
                              "dataset_type=synthetic")
  if list(c.mesh_axes) != list(sharding.MESH_AXES):
    raise ValueError(f"mesh_axes must be {list(sharding.MESH_AXES)}; got {list(c.mesh_axes)}")
  remat.check_names(tuple(c.names_which_can_be_saved) + tuple(c.names_which_can_be_offloaded))


def model_config(c) -> transformer.Config:
  """The transformer config: the checkpoint's architecture (or the preset's) + run options."""
  if c.pretrained_model_name_or_path or c.transformer_pretrained_model_name_or_path:
    path = c.transformer_pretrained_model_name_or_path or c.pretrained_model_name_or_path
    arch = transformer_checkpoint.read_config(path, c.expert)
  elif c.model_preset in transformer.PRESETS:
    arch = transformer.PRESETS[c.model_preset]
  else:
    raise ValueError(f"model_preset={c.model_preset!r} is not one of "
                     f"{sorted(transformer.PRESETS)}")
  boundary = c.boundary or arch.boundary
  return dataclasses.replace(
      arch, scan_layers=c.scan_layers, remat_policy=c.remat_policy,
      names_which_can_be_saved=tuple(c.names_which_can_be_saved),
      names_which_can_be_offloaded=tuple(c.names_which_can_be_offloaded),
      weights_dtype=c.weights_dtype, activations_dtype=c.activations_dtype,
      precision=c.precision, attention=c.attention,
      flash_min_seq_length=c.flash_min_seq_length,
      flash_block_sizes=tuple(sorted(c.flash_block_sizes.items())) or None,
      split_head_dim=c.split_head_dim, attention_sharding_uniform=c.attention_sharding_uniform,
      mask_padding_tokens=c.mask_padding_tokens, dropout=c.dropout, boundary=boundary)


def _conditioning(c, model: transformer.Config) -> str:
  concat = model.in_channels == model.out_channels + 20  # noisy + 4 mask + 16 condition
  if c.model_type == "T2V":
    if model.in_channels != model.out_channels:
      raise ValueError(f"model_type=T2V but the model takes {model.in_channels} input channels "
                       "(an image-to-video model); set model_type=I2V")
    return "none"
  if concat:
    return "concat"
  if model.in_channels == 48:  # TI2V 5B: I2V by a clean first frame
    if model.patch_size[0] != 1:
      raise ValueError("first-frame conditioning needs a temporal patch size of 1")
    return "first_frame"
  raise ValueError(f"model_type=I2V needs an image-to-video model (36 input channels) or the "
                   f"TI2V 5B model; this one takes {model.in_channels}")


def _latent_shape(c, model):
  wan22_vae = model.out_channels == 48  # the Wan 2.2 VAE: 16x spatial, 48 channels
  spatial = 16 if wan22_vae else 8
  height = c.synthetic_override_height or c.height
  width = c.synthetic_override_width or c.width
  frames = c.synthetic_override_num_frames or c.num_frames
  if frames < 1 or (frames - 1) % 4:
    k = max(0, (frames - 1) // 4)
    raise ValueError(f"num_frames={frames} must be 4k+1 (the VAE compresses time 4x after the "
                     f"first frame); use {4 * k + 1} or {4 * k + 5}")
  _, ph, pw = model.patch_size
  for name, size, patch in (("height", height, ph), ("width", width, pw)):
    factor = spatial * patch
    if size % factor:
      raise ValueError(f"{name}={size} must be divisible by {factor} (VAE {spatial}x times "
                       f"patch {patch}); use {size // factor * factor or factor} or "
                       f"{(size // factor + 1) * factor}")
  return ((frames - 1) // 4 + 1, height // spatial, width // spatial, model.out_channels)


def _batch(c, num_devices, num_processes, ici, dcn):
  if c.global_batch_size > 0:
    global_batch = int(c.global_batch_size)
  else:
    exact = c.per_device_batch_size * num_devices
    if c.per_device_batch_size <= 0 or abs(exact - round(exact)) > 1e-9 or round(exact) < 1:
      raise ValueError(f"per_device_batch_size={c.per_device_batch_size} x {num_devices} devices "
                       f"= {exact:g} is not a whole global batch; use a multiple of "
                       f"1/{num_devices} or set global_batch_size")
    global_batch = round(exact)
  data = ici["data"] * dcn["data"]
  if global_batch % data:
    raise ValueError(f"global batch {global_batch} does not split over data parallelism {data}; "
                     f"use a global batch that is a multiple of {data}")
  if global_batch % num_processes:
    raise ValueError(f"global batch {global_batch} does not split over {num_processes} hosts; "
                     f"use a multiple of {num_processes}")
  return global_batch


def _steps(c, global_batch):
  if c.max_train_steps > 0:
    steps = int(c.max_train_steps)
  elif c.synthetic_num_samples:
    steps = int(c.num_train_epochs) * math.ceil(c.synthetic_num_samples / global_batch)
  else:
    raise ValueError("max_train_steps <= 0 and the data set is infinite: set max_train_steps, "
                     "or synthetic_num_samples with num_train_epochs")
  schedule = steps if c.learning_rate_schedule_steps < 0 else int(c.learning_rate_schedule_steps)
  if not 0.0 <= c.warmup_steps_fraction <= 1.0:
    raise ValueError(f"warmup_steps_fraction={c.warmup_steps_fraction} must be in [0, 1]")
  return steps, schedule, int(c.warmup_steps_fraction * schedule)


def _sigma_range(c, model):
  if model.boundary is None:
    return (0.0, 1.0)
  if not 0.0 < model.boundary < 1.0:
    raise ValueError(f"boundary={model.boundary} must be in (0, 1)")
  return (model.boundary, 1.0) if c.expert == "high_noise" else (0.0, model.boundary)


def plan(c, num_devices: int, num_processes: int = 1, num_granules: int | None = None) -> Plan:
  """Validates `c` for `num_devices` devices on `num_processes` hosts, whose DCN axes span
  `num_granules` slices or hosts (default: one per host); returns the run's Plan."""
  _check_enums_and_pending(c)
  model = model_config(c)
  axes = sharding.MESH_AXES
  ici, dcn = sharding.mesh_shape({a: c[f"ici_{a}"] for a in axes},
                                 {a: c[f"dcn_{a}"] for a in axes}, num_devices,
                                 num_granules or num_processes)
  tensor = ici["tensor"] * dcn["tensor"]
  heads = model.num_attention_heads
  if heads % tensor:
    raise ValueError(f"tensor parallelism {tensor} does not divide {heads} heads; use "
                     f"{', '.join(map(str, _divisors(heads)[:-1]))} or {heads}")
  conditioning = _conditioning(c, model)
  latent_shape = _latent_shape(c, model)
  pt, ph, pw = model.patch_size
  seq_len = (latent_shape[0] // pt) * (latent_shape[1] // ph) * (latent_shape[2] // pw)
  context = ici["context"] * dcn["context"]
  if seq_len % context:
    raise ValueError(f"context parallelism {context} does not divide the {seq_len} video tokens "
                     f"of {latent_shape[:3]} latents; use one of "
                     f"{[d for d in _divisors(seq_len) if d <= num_devices]}")
  global_batch = _batch(c, num_devices, num_processes, ici, dcn)
  steps, schedule, warmup = _steps(c, global_batch)
  text_len = c.synthetic_override_max_sequence_length or c.max_sequence_length
  lr = c.learning_rate * (global_batch if c.scale_lr else 1)
  if not 0.0 <= c.caption_dropout < 1.0:
    raise ValueError(f"caption_dropout={c.caption_dropout} must be in [0, 1)")
  if c.flow_shift <= 0:
    raise ValueError(f"flow_shift={c.flow_shift} must be > 0 (1 = no shift)")
  return Plan(model=model, ici=ici, dcn=dcn, global_batch=global_batch,
              latent_shape=latent_shape, text_len=text_len,
              image_len=257 if model.image_dim is not None else 0, conditioning=conditioning,
              seq_len=seq_len, num_steps=steps, schedule_steps=schedule, warmup_steps=warmup,
              learning_rate=lr, sigma_range=_sigma_range(c, model))
