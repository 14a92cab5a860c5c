"""Shared defaults of every training config; one field per parameter of MaxDiffusion's
train_wan.py (docs/config.md maps each seed parameter to its field here).

Model config files (wan21_t2v.py, ...) start from `get_config()` and set the model fields and
variants; anything can be overridden on the command line: --config.learning_rate=1e-4. List
fields are tuples: --config.names_which_can_be_saved=attn_output,ffn_activation.
"""

import ml_collections


def get_config():
  c = ml_collections.ConfigDict()

  # Run.
  # train | prepare (encode a data set into a cache, docs/data.md) | generate (videos from
  # prompts, docs/generation.md) | export (a run as a diffusers model root, docs/lora.md)
  c.job = "train"
  c.run_name = "wan"
  # Local path (relative to the working directory, ~ allowed) or bucket (gs://...); outputs go
  # under {output_dir}/{run_name}/.
  c.output_dir = "out"

  # Model. An empty pretrained path trains from a random init of `model_preset`.
  c.pretrained_model_name_or_path = ""
  c.transformer_pretrained_model_name_or_path = ""  # overrides the model's transformer/
  c.model_name = "wan2.1"  # wan2.1 | wan2.2
  c.model_type = "T2V"  # T2V | I2V
  c.model_preset = "wan2.1-t2v-14b"  # a wan.transformer.PRESETS name: architecture and family
  # Wan 2.2 A14B: the expert this run trains: high_noise | low_noise | both (each step trains
  # the expert of its noise level; learning_rate_low_noise: the low-noise one's, 0: learning_rate)
  c.expert = "high_noise"
  c.learning_rate_low_noise = 0.0
  c.boundary = 0.0  # A14B: sigma where the experts hand over (0 = model_index.json's / family's)
  c.weights_dtype = "bfloat16"
  c.activations_dtype = "bfloat16"
  c.precision = "DEFAULT"  # DEFAULT | HIGH | HIGHEST
  c.from_pt = True  # weights are PyTorch-format safetensors (the only format read)
  c.scan_layers = True
  c.replicate_vae = False

  # Attention.
  c.attention = "flash"  # dot_product | flash | cudnn_flash_te (NVIDIA) | ring (context axis)
  c.split_head_dim = True  # dot_product only: heads as their own dimension (False: in batch)
  c.attention_sharding_uniform = True  # K/V sharded over context like queries (False: whole)
  c.mask_padding_tokens = True
  c.flash_min_seq_length = 4096
  c.flash_block_sizes = ml_collections.ConfigDict()  # empty = tuned per device

  # Training.
  c.learning_rate = 1e-5
  c.scale_lr = False  # multiply the learning rate by the global batch size
  c.max_train_steps = 1500  # takes priority over num_train_epochs when > 0
  c.num_train_epochs = 1
  c.per_device_batch_size = 1.0  # may be fractional; must make a whole global batch
  c.global_batch_size = 0  # > 0 overrides per_device_batch_size * devices
  # Each step runs the global batch as this many equal micro-batches, one after another, and
  # averages their gradients (the memory of one micro-batch, the update of the whole batch).
  c.gradient_accumulation_steps = 1
  # A step whose loss, gradients or updated parameters are not finite is skipped (counted in
  # the metrics as nonfinite_steps); this many in a row stop the run.
  c.max_nonfinite_steps = 10
  c.warmup_steps_fraction = 0.1
  c.learning_rate_schedule_steps = -1  # -1 = the number of training steps
  c.lr_schedule = "constant"  # after warmup: constant | linear | cosine (decay to 0)
  c.seed = 0

  # Optimizer (AdamW).
  c.adam_b1 = 0.9
  c.adam_b2 = 0.999
  c.adam_eps = 1e-8
  c.adam_weight_decay = 0.0
  c.max_grad_norm = 1.0  # global-norm clipping; <= 0 disables it
  c.save_optimizer = True  # needed for an exact resume

  # Flow matching.
  c.timestep_sampling = "uniform"  # uniform | logit_normal, then shifted by flow_shift
  c.logit_mean = 0.0
  c.logit_std = 1.0
  c.flow_shift = 5.0  # sigma' = s * sigma / (1 + (s - 1) * sigma); training and generation
  c.disable_training_weights = False  # False: bell-shaped mid-timestep loss weighting
  c.caption_dropout = 0.0  # probability of an empty caption (for classifier-free guidance)

  # Gradient checkpointing (remat).
  # AUTO | NONE | FULL | MATMUL_WITHOUT_BATCH | OFFLOAD_MATMUL_WITHOUT_BATCH | CUSTOM. AUTO
  # compiles the train step under NONE, CUSTOM saving flash_residuals (the flash kernels'
  # output and lse: the backward runs no forward kernel again) and FULL, least recomputation
  # first, and keeps the first that fits the devices' memory; which one that is differs by
  # model, resolution and slice (the README's capacity table; NONE fits only the 5B at 480p
  # on v5p-128).
  c.remat_policy = "AUTO"
  c.names_which_can_be_saved = ()
  c.names_which_can_be_offloaded = ()
  c.dropout = 0.0

  # Data (docs/data.md). job=prepare encodes a data set into a cache (tfrecords_dir); training
  # reads a cache (dataset_type=tfrecord | grain) or encodes on the fly (tf | hf).
  c.dataset_type = "synthetic"  # synthetic | tfrecord | grain | tf | hf
  c.dataset_name = ""  # hf: a Hugging Face data set on local disk (save_to_disk dir or data dir)
  # prepare / tf: a folder of clips with captions, a metadata.csv or a .jsonl; tfrecord / grain:
  # the cache that job=prepare wrote.
  c.train_data_dir = ""
  c.dataset_config = ""  # prepare / tf: a musubi-tuner dataset TOML (instead of train_data_dir)
  c.caption_extension = ".txt"  # folders: the caption of clip.mp4 is clip.txt
  c.train_split = "train"  # hf
  c.load_tfrecord_cached = True  # records hold latents + text states (the only kind written)
  c.dataset_save_location = ""  # tf / hf: encode once into this cache, then train from it
  c.image_column = "image"  # hf and metadata.csv: the clip column ("video"/"image" if absent)
  c.caption_column = "text"  # hf and metadata.csv: the caption column ("prompt" if absent)
  # Frame size: clips are resized and centre-cropped to height x width, or with enable_bucket
  # to the aspect-ratio bucket of that area nearest to theirs. resolution > 0: a square area
  # resolution x resolution instead (musubi's scalar resolution).
  c.resolution = 0
  c.height = 720
  c.width = 1280
  c.enable_bucket = False
  c.bucket_no_upscale = False  # buckets never larger than the clip itself
  c.num_frames = 81  # frames per clip (4k+1); the target_frames of folder/CSV/JSONL sources
  c.frame_extraction = "head"  # head | chunk | slide | uniform | full (musubi-tuner's meanings)
  c.frame_stride = 1  # slide: frames between clip starts
  c.frame_sample = 1  # uniform: clips per video
  c.max_frames = 129  # full: longest clip
  c.source_fps = 0.0  # 0: each file's own frame rate; clips are resampled to the model's fps
  c.num_repeats = 1  # passes over each clip per epoch
  c.max_sequence_length = 512
  c.enable_data_shuffling = True  # seeded, reshuffled every epoch
  c.pack_sequences = False  # pack clips of different buckets into one token sequence
  c.synthetic_num_samples = ml_collections.config_dict.placeholder(int)  # None = infinite
  c.synthetic_override_height = 0  # 0 = use height
  c.synthetic_override_width = 0
  c.synthetic_override_num_frames = 0
  c.synthetic_override_max_sequence_length = 0

  # Parallelism: mesh axes data, fsdp, context, tensor; -1 fills the remaining devices.
  c.hardware = "tpu"  # tpu | gpu | cpu
  c.mesh_axes = ("data", "fsdp", "context", "tensor")
  c.dcn_data = -1  # data parallel across slices/hosts (1 on a single host)
  c.dcn_fsdp = 1
  c.dcn_context = 1
  c.dcn_tensor = 1
  c.ici_data = 1
  c.ici_fsdp = -1
  c.ici_context = 1
  c.ici_tensor = 1
  # Multi-host: set all three, or leave empty to auto-detect on TPU pods / SLURM / single host.
  c.coordinator_address = ""
  c.num_processes = 0
  c.process_id = -1
  # Persistent XLA compilation cache (local path or bucket), shared by runs of the same program:
  # a restart or a second run skips compilation. "" = jax's own setting (off, unless the
  # environment sets JAX_COMPILATION_CACHE_DIR).
  c.jax_cache_dir = ""

  # Checkpointing.
  c.checkpoint_every = -1  # in samples; -1 disables
  c.checkpoint_dir = ""  # "" = {output_dir}/{run_name}/checkpoints
  c.checkpoints_to_keep = 3
  c.enable_single_replica_ckpt_restoring = False

  # Evaluation during training (docs/generation.md), every eval_every steps: the flow loss at
  # fixed timesteps over eval clips, sample videos, SSIM of videos made from eval captions.
  c.eval_every = -1
  c.eval_data_dir = ""  # the eval cache (job=prepare: the eval clips, cached to tfrecords_dir/eval)
  c.enable_generate_video_for_eval = False
  c.timestep_eval = False
  c.timesteps_list = (125, 250, 375, 500, 625, 750, 875)
  c.num_eval_samples = 420
  c.eval_max_number_of_samples_in_bucket = 60
  c.enable_ssim = False

  # Metrics and logging.
  c.write_metrics = True
  c.gcs_metrics = False  # must be True exactly when output_dir is a bucket (metrics go there)
  c.tensorboard_flush_period = 10  # steps
  c.log_every = 1

  # Profiling.
  c.enable_profiler = False
  c.skip_first_n_steps_for_profiler = 5
  c.profiler_steps = 10
  c.enable_jax_named_scopes = False

  # Generation (job=generate and the eval videos); the sampling shift is flow_shift.
  c.prompt = ""
  c.prompts_file = ""  # instead of prompt: one prompt per line
  c.negative_prompt = ""
  c.image = ""  # I2V: the conditioning image (TI2V: optional)
  c.guidance_scale = 5.0  # classifier-free guidance; <= 1: none
  c.guidance_scale_2 = 0.0  # Wan 2.2 A14B low-noise expert (0: guidance_scale)
  c.num_inference_steps = 50
  c.sampler = "unipc"  # unipc | euler | dpm++
  c.fps = 0.0  # frame rate of the videos written (0: the model's, 16 or 24 for TI2V 5B)

  # LoRA (docs/lora.md). Training: an adapter of rank lora_config.rank[0] over a frozen base;
  # the first LoRA of lora_model_name_or_path starts it, the others are merged into the base.
  # Generation: every listed LoRA is merged at its scale.
  c.enable_lora = False
  c.lora_config = ml_collections.ConfigDict(dict(
      rank=(64,), lora_model_name_or_path=(), weight_name=(), adapter_name=(), scale=(1.0,),
      from_pt=()))
  c.lora_alpha = 0.0  # the adapter's scale is lora_alpha / rank (0: alpha = rank; musubi: 1)
  c.lora_targets = "blocks/.*"  # regex over block linear paths (blocks/self_attn/q, blocks/ffn/fc1)

  # Quantization (not implemented yet).
  c.quantization = ""
  c.use_qwix_quantization = False
  c.weight_quantization_calibration_method = "absmax"
  c.act_quantization_calibration_method = "absmax"
  c.bwd_quantization_calibration_method = "absmax"
  c.qwix_module_path = ".*"

  # Export (job=export): a run's newest checkpoint as a diffusers model root in export_dir (the
  # other components copied from pretrained_model_name_or_path); a LoRA run writes its LoRA
  # files, and with export_merged the transformer with the adapters merged too.
  c.export_dir = ""
  c.export_merged = False

  # Data preparation (job=prepare): the cache it writes, and records per shard (0: one shard per
  # bucket and process).
  c.tfrecords_dir = ""
  c.no_records_per_shard = 0
  return c


def for_model(variant: str, variants: dict, run_name: str, **fields):
  """The config of one model family: base defaults, then `fields`, then the variant's own.

  `variants` maps each variant name to a transformer preset, or to (preset, {field: value}); the
  first is the family's default. "tiny" always exists: the first variant shrunk by `tiny`.
  """
  names = list(variants) + ["tiny"]
  if variant not in names:
    raise ValueError(f"unknown variant {variant!r}; choose from {names}")
  c = get_config()
  c.update(fields)
  c.run_name = f"{run_name}_{variant}"
  preset, overrides = _preset(variants[variant if variant != "tiny" else names[0]])
  c.model_preset = preset
  if variant == "tiny":
    tiny(c)
  else:
    c.update(overrides)
  c.lock()  # a misspelt field is an error, not a new field
  return c


def _preset(entry):
  return (entry, {}) if isinstance(entry, str) else entry


def tiny(c):
  """Turns a config into its CPU-sized variant: tiny model, synthetic data, a few dozen steps."""
  c.model_preset = "tiny-" + c.model_preset.split("-", 1)[1].split("-")[0] + (
      "-a14b" if c.model_preset.endswith("a14b") else "")
  c.weights_dtype = "float32"
  c.activations_dtype = "float32"
  c.remat_policy = "NONE"  # a tiny model's activations need no recomputation
  c.hardware = "cpu"
  c.height = 64
  c.width = 64
  c.num_frames = 5
  c.max_sequence_length = 16
  c.learning_rate = 1e-3
  c.max_train_steps = 30
  c.per_device_batch_size = 1.0
  c.global_batch_size = 2
  c.ici_fsdp = -1
  c.attention = "dot_product"  # the Pallas kernels run interpreted (slowly) on CPU
  c.flash_min_seq_length = 0  # so that attention=flash runs the kernel on the tiny videos
  c.checkpoint_every = 20
  c.mask_padding_tokens = True
  return c


# MaxDiffusion's names for fields that exist here under another name (or not at all), so that
# a user's MaxDiffusion command line gets told what to write instead: name -> (ours, note).
MAXDIFFUSION_NAMES = {
    **{f"{kind}_{axis}_parallelism": (f"{kind}_{axis}", "")
       for kind in ("ici", "dcn") for axis in ("data", "fsdp", "context", "tensor")},
    "base_output_directory": ("output_dir", "a local path or gs:// bucket"),
    "log_period": ("tensorboard_flush_period", "steps between flushes of the metrics files"),
    "wan_transformer_pretrained_model_name_or_path": ("transformer_pretrained_model_name_or_path",
                                                      ""),
    "enable_eval_timesteps": ("timestep_eval", "timestep-bucketed evaluation"),
    "metrics_file": ("", "metrics are always {output_dir}/{run_name}/metrics.jsonl"),
    "save_config_to_gcs": ("", "the plan summary is printed at the start of each run"),
    "jit_initializers": ("", "parameters are always initialised by one jitted, sharded program"),
    "skip_jax_distributed_system": ("", "single-process runs never join a cluster; multi-host "
                                    "runs set coordinator_address or are auto-detected"),
    "logical_axis_rules": ("", "the rule table is wan/sharding.py's RULES"),
    "allow_split_physical_axes": ("", "meshes come from jax.experimental.mesh_utils"),
    "max_train_samples": ("", "use max_train_steps, or synthetic_num_samples with "
                          "num_train_epochs"),
    "cache_latents_text_encoder_outputs": ("load_tfrecord_cached", "records hold latents and "
                                           "text states"),
}
