"""The plan: every config error comes before any work and says what to change; every field works
or is refused; paths, shapes, meshes and parameter placement; docs/config.md covers every field."""

import json
import os
import re
import shutil

import jax
import jax.numpy as jnp
import pytest

from configs import base, wan21_i2v, wan21_t2v, wan22_i2v, wan22_t2v, wan22_ti2v
from tests.conftest import GOLDEN_DIR
from wan import params, plan, transformer
from wan.errors import ConfigError, MissingFile, NotImplementedYet, UserError


def _plan(module=wan21_t2v, devices=8, processes=1, platform="cpu", variant="tiny", **overrides):
  c = module.get_config(variant)
  for field, value in overrides.items():
    c[field] = value  # (update() cannot fill the empty, locked flash_block_sizes)
  return plan.make(c, plan.Devices(devices, processes, platform=platform))


def test_tiny_plans_derive_latent_shapes_and_batches():
  p = _plan()
  assert p.latent_shape == (2, 8, 8, 16) and p.seq_len == 2 * 4 * 4
  assert p.global_batch == 2 and p.ici == dict(data=1, fsdp=8, context=1, tensor=1)
  assert (p.family.name, p.conditioning) == ("wan2.1-t2v", "none")
  p = _plan(wan22_ti2v)
  assert p.latent_shape == (2, 4, 4, 48)  # Wan 2.2 VAE: 16x spatial, 48 channels
  assert _plan(wan22_ti2v, model_type="I2V").conditioning == "first_frame"
  assert _plan(wan21_i2v).conditioning == "concat" and _plan(wan21_i2v).image_len == 257
  assert _plan(wan22_i2v).conditioning == "concat" and _plan(wan22_i2v).image_len == 0


@pytest.mark.parametrize("overrides, message", [
    (dict(ici_fsdp=3), "multiplies to 3 but there are 8 devices"),
    (dict(ici_fsdp=-1, ici_tensor=3), "do not divide 8 devices|does not divide 8"),
    (dict(ici_fsdp=1, ici_tensor=8), "tensor parallelism 8 does not divide 2 heads; use 1 or 2"),
    (dict(global_batch_size=0, per_device_batch_size=0.3),
     r"0.3 x 8 devices = 2.4 is not a whole global batch"),
    (dict(global_batch_size=3, ici_data=2, ici_fsdp=-1), "does not split over data parallelism 2"),
    (dict(num_frames=8), "num_frames=8 must be 4k\\+1.*use 5 or 9"),
    (dict(height=72), "height=72 must be divisible by 16.*use 64 or 80"),
    (dict(width=100), "width=100 must be divisible by 16"),
    (dict(ici_fsdp=2, ici_context=4, height=48, width=48),
     "context parallelism 4 does not divide the 18 video tokens"),
    (dict(attention="magic"), "attention='magic' is not one of"),
    (dict(remat_policy="SOME"), "remat_policy='SOME' is not one of"),
    (dict(attention="flash", flash_block_sizes=dict(block_z=256)), "unknown block size names"),
    (dict(model_type="V2V"), "model_type='V2V'"),
    (dict(precision="LOW"), "precision='LOW'"),
    (dict(model_preset="huge"), "model_preset='huge' is not one of"),
    (dict(remat_policy="CUSTOM", names_which_can_be_saved=("qkv",)), "unknown checkpoint names"),
    (dict(remat_policy="CUSTOM", names_which_can_be_saved=("flash_residuals",),
          attention="dot_product"), "attention=dot_product has none"),
    (dict(remat_policy="CUSTOM", names_which_can_be_saved=("flash_residuals",),
          attention="flash", flash_min_seq_length=4096),
     "tokens are fewer than flash_min_seq_length=4096"),
    (dict(model_type="I2V"), "model_type=I2V needs an image-to-video model"),
    (dict(max_train_steps=0), "set max_train_steps"),
    (dict(mesh_axes=("fsdp", "data", "context", "tensor")), "mesh_axes must be"),
    # Holes found by trying the project as a user: each failed late or not at all.
    (dict(width=0), "width=0 must be > 0"),
    (dict(height=-16), "height=-16 must be > 0"),
    (dict(num_frames=0), "num_frames=0 must be > 0"),
    (dict(log_every=0), "log_every=0 must be >= 1"),
    (dict(checkpoints_to_keep=0), "checkpoints_to_keep=0 must be >= 1"),
    (dict(checkpoint_every=0), r"checkpoint_every=0 must be -1 \(no checkpoints\) or > 0"),
    (dict(learning_rate=-1e-4), "learning_rate=-0.0001 must be > 0"),
    (dict(adam_b1=2.0), r"adam_b1=2.0 must be in \[0, 1\)"),
    (dict(adam_b2=1.0), r"adam_b2=1.0 must be in \[0, 1\)"),
    (dict(adam_eps=0.0), "adam_eps=0.0 must be > 0"),
    (dict(seed=-1), "seed=-1 must be >= 0"),
    (dict(max_sequence_length=0), "max_sequence_length=0 must be >= 1"),
    (dict(synthetic_num_samples=0), "synthetic_num_samples=0 must be >= 1"),
    (dict(tensorboard_flush_period=0), "tensorboard_flush_period=0 must be >= 1"),
    (dict(learning_rate_schedule_steps=0), "learning_rate_schedule_steps=0 must be -1"),
    (dict(dropout=1.0), r"dropout=1.0 must be in \[0, 1\)"),
    (dict(run_name=""), "run_name='' must be a non-empty name"),
    (dict(hardware="tpu"), "hardware=tpu but the devices are cpu; set hardware=cpu"),
    (dict(model_name="wan2.2"), "model_name=wan2.2 does not match model_preset=tiny-t2v, a "
     "wan2.1 model"),
    (dict(expert="low_noise"), "expert=low_noise applies only to the two-expert Wan 2.2 A14B"),
    (dict(boundary=0.5), "boundary=0.5 applies only to the two-expert Wan 2.2 A14B"),
    (dict(attention_sharding_uniform=False), "attention_sharding_uniform=False has no effect "
     "without context parallelism"),
    (dict(attention="cudnn_flash_te"), "cudnn_flash_te runs cuDNN flash attention on NVIDIA"),
    (dict(coordinator_address="localhost:1234"), "coordinator_address needs num_processes >= 1"),
])
def test_validation_errors_say_what_to_change(overrides, message):
  with pytest.raises(ConfigError, match=message):
    _plan(**overrides)


def test_a_valid_mesh_with_tensor_parallelism_plans():
  assert _plan(ici_fsdp=4, ici_tensor=2).mesh_shape["tensor"] == 2


# The fields that used to be accepted and silently ignored, with a value a user might set.
IGNORED_BEFORE = dict(
    resolution=480, enable_data_shuffling=False, dataset_name="me/clips",
    train_data_dir="/nonexistent", train_split="validation", load_tfrecord_cached=False,
    dataset_save_location="/tmp/cache", image_column="video", caption_column="prompt",
    timesteps_list=(100, 200), num_eval_samples=10, eval_max_number_of_samples_in_bucket=5,
    negative_prompt="blurry", guidance_scale=7.0, num_inference_steps=30, fps=24.0,
    eval_every=10, guidance_scale_2=3.0, sampler="euler", prompts_file="/tmp/prompts.txt",
    image="/tmp/cat.png", eval_data_dir="/tmp/eval",
    weight_quantization_calibration_method="fixed", act_quantization_calibration_method="fixed",
    bwd_quantization_calibration_method="fixed", qwix_module_path="blocks.*", prompt="a cat")
SWITCHES = {"resolution": "dataset_type", "timesteps_list": "timestep_eval",
            "negative_prompt": "enable_generate_video_for_eval", "prompt": "job=generate",
            "eval_every": "timestep_eval", "eval_data_dir": "enable_ssim",
            "qwix_module_path": "use_qwix_quantization"}


@pytest.mark.parametrize("field", sorted(IGNORED_BEFORE))
def test_a_field_that_needs_a_switch_names_the_switch(field):
  gate = plan.GATED[field][1][0]
  with pytest.raises(ConfigError, match=f"{field}=.* has no effect unless "
                                        f"{re.escape(gate)}"):
    _plan(**{field: IGNORED_BEFORE[field]})
  if field in SWITCHES:
    assert SWITCHES[field] in gate


def test_lora_config_needs_enable_lora():
  c = wan21_t2v.get_config("tiny")
  c.lora_config.rank = (16,)
  with pytest.raises(ConfigError, match="lora_config=.* has no effect unless enable_lora=True"):
    plan.make(c, plan.Devices(8))


def test_gcs_metrics_must_agree_with_output_dir(tmp_path):
  with pytest.raises(ConfigError, match="gcs_metrics=True but output_dir=.* is local"):
    _plan(gcs_metrics=True, output_dir=str(tmp_path))
  with pytest.raises(ConfigError, match="is a bucket.*set gcs_metrics=True"):
    _plan(output_dir="gs://bucket/runs")
  assert _plan(output_dir="gs://bucket/runs", gcs_metrics=True).outputs.run_dir == \
      "gs://bucket/runs/wan21_t2v_tiny"
  assert _plan(output_dir="gs://bucket/runs", write_metrics=False).outputs.run_dir


@pytest.mark.parametrize("field, value, error", [
    ("replicate_vae", True, NotImplementedYet), ("from_pt", False, NotImplementedYet)])
def test_features_not_built_yet_refuse_other_values(field, value, error):
  with pytest.raises(error, match=f"{field}=.* is not implemented yet"):
    _plan(**{field: value})
  assert issubclass(error, NotImplementedError) and issubclass(error, UserError)


@pytest.mark.parametrize("overrides, message", [
    (dict(dataset_type="tfrecord"), "reads a cache that job=prepare wrote: set train_data_dir"),
    (dict(dataset_type="tfrecord", train_data_dir="/nonexistent/cache"),
     "holds no manifest.json.*job=prepare"),
    (dict(dataset_type="tf"), "set train_data_dir to a folder of clips"),
    (dict(dataset_type="tf", train_data_dir="/nonexistent"), "train_data_dir: /nonexistent does "
                                                            "not exist"),
    (dict(dataset_type="hf"), "dataset_type=hf needs dataset_name"),
    (dict(dataset_type="tfrecord", train_data_dir="/c", load_tfrecord_cached=False),
     "caches always hold encoded latents.*dataset_type=tf"),
    (dict(pack_sequences=True), "pack_sequences=True has no effect unless dataset_type="),
    (dict(frame_extraction="chunk"), "frame_extraction='chunk' has no effect unless job=prepare"),
    (dict(frame_extraction="middle", job="prepare"), "frame_extraction='middle' is not one of"),
    (dict(dataset_type="hf", dataset_name="/d", train_data_dir="/x"),
     "train_data_dir='/x' has no effect unless"),
    (dict(dataset_type="tfrecord", train_data_dir="/c", synthetic_override_height=32),
     "synthetic_override_height=32 has no effect unless dataset_type=synthetic"),
    (dict(no_records_per_shard=10), "no_records_per_shard=10 has no effect unless job=prepare"),
    (dict(job="prepare"), "job=prepare has no train plan"),
])
def test_data_fields_say_what_to_change(overrides, message):
  with pytest.raises(UserError, match=message):
    _plan(**overrides)


def test_prepare_plan_errors(tmp_path):
  c = wan21_t2v.get_config("tiny")
  c.job = "prepare"
  with pytest.raises(ConfigError, match="writes its cache to tfrecords_dir"):
    plan.preparation(c)
  c.tfrecords_dir, c.train_data_dir = str(tmp_path / "cache"), "/nonexistent"
  with pytest.raises(MissingFile, match="train_data_dir: /nonexistent does not exist"):
    plan.preparation(c)
  (tmp_path / "clips").mkdir()
  (tmp_path / "clips" / "a.mp4").write_bytes(b"x")
  c.tfrecords_dir, c.train_data_dir = str(tmp_path / "cache"), str(tmp_path / "clips")
  c.resolution = 72
  with pytest.raises(ConfigError, match="resolution=72 must be a multiple of 16 .*; use 64 or 80"):
    plan.preparation(c)
  c.resolution = 0
  c.dataset_config = str(tmp_path / "d.toml")
  with pytest.raises(ConfigError, match="train_data_dir or dataset_config"):
    plan.preparation(c)
  full = wan21_t2v.get_config()
  full.job, full.tfrecords_dir, full.train_data_dir = "prepare", c.tfrecords_dir, c.train_data_dir
  with pytest.raises(ConfigError, match="needs the VAE and text encoder"):
    plan.preparation(full)
  (tmp_path / "cache").mkdir()
  (tmp_path / "cache" / "notes.txt").write_text("mine")
  with pytest.raises(ConfigError, match="not empty and holds no cache"):
    plan.preparation(dict_copy(c, dataset_config=""))


def dict_copy(c, **fields):
  c = c.copy_and_resolve_references()
  c.update(fields)
  return c


def test_every_refusal_table_matches_the_base_defaults():
  """The values that mean "off" in the plan's tables are the configs' defaults."""
  defaults = base.get_config()
  for field, off in plan.NOT_IMPLEMENTED.items():
    assert defaults[field] == off, field
  for field, (off, _) in plan.GATED.items():
    assert plan._plain(defaults[field]) == plan._plain(off), field  # pylint: disable=protected-access
  for module in (wan21_t2v, wan21_i2v, wan22_t2v, wan22_i2v, wan22_ti2v):
    for variant in ("tiny", None):
      c = module.get_config(variant) if variant else module.get_config()
      c.hardware = "tpu"
      plan.check(c)  # every shipped config passes its own checks


def test_list_fields_take_comma_separated_names():
  # `--config.names_which_can_be_saved=attn_output,ffn_activation` arrives as one string.
  p = _plan(remat_policy="CUSTOM", names_which_can_be_saved=("attn_output,ffn_activation",),
            names_which_can_be_offloaded=("xq_out",))
  assert p.options.names_which_can_be_saved == ("attn_output", "ffn_activation")
  assert p.options.names_which_can_be_offloaded == ("xq_out",)


def test_attention_options_reach_the_model():
  o = _plan(attention="ring", split_head_dim=False, attention_sharding_uniform=False,
            ici_fsdp=4, ici_context=2, flash_min_seq_length=64,
            flash_block_sizes=dict(block_q=256, block_kv=128)).options
  assert (o.attention, o.split_head_dim, o.attention_sharding_uniform) == ("ring", False, False)
  assert o.flash_min_seq_length == 64
  assert o.flash_block_sizes == (("block_kv", 128), ("block_q", 256))


def test_t2v_model_with_i2v_preset_is_refused():
  with pytest.raises(ConfigError, match="model_type=T2V needs a text-to-video model"):
    _plan(model_preset="tiny-i2v")


def test_batch_must_split_over_hosts():
  with pytest.raises(ConfigError, match="does not split over 4 hosts"):
    _plan(global_batch_size=2, devices=8, processes=4, ici_fsdp=-1, dcn_data=1, dcn_fsdp=-1)


def test_fractional_per_device_batch():
  p = _plan(global_batch_size=0, per_device_batch_size=0.25, ici_fsdp=2, ici_context=4)
  assert p.global_batch == 2


def test_a14b_experts_split_sigma_at_the_boundary():
  assert _plan(wan22_t2v).flow.sigma_range == (0.875, 1.0)
  assert _plan(wan22_t2v, expert="low_noise").flow.sigma_range == (0.0, 0.875)
  assert _plan(wan22_t2v, boundary=0.5).flow.sigma_range == (0.5, 1.0)
  assert _plan(wan22_i2v).flow.sigma_range == (0.9, 1.0)
  both = _plan(wan22_t2v, expert="both")  # each step draws its expert's side
  assert both.flow.sigma_range == (0.0, 1.0) and both.boundary == 0.875
  assert both.param_count == 2 * _plan(wan22_t2v).param_count
  with pytest.raises(ConfigError, match="expert='all' is not one of"):
    _plan(wan22_t2v, expert="all")


def _a14b_root(tmp_path, boundary_ratio):
  root = tmp_path / "Wan2.2-T2V-A14B-Diffusers"
  for sub in ("transformer", "transformer_2"):
    shutil.copytree(os.path.join(GOLDEN_DIR, "transformer_t2v"), root / sub)
  index = {"_class_name": "WanPipeline", "transformer": ["diffusers", "WanTransformer3DModel"]}
  if boundary_ratio is not None:
    index["boundary_ratio"] = boundary_ratio
  (root / "model_index.json").write_text(json.dumps(index))
  return str(root)


def test_checkpoint_root_gives_architecture_and_boundary(tmp_path):
  root = _a14b_root(tmp_path, 0.6)
  p = _plan(wan22_t2v, pretrained_model_name_or_path=root, expert="low_noise")
  assert p.flow.sigma_range == (0.0, 0.6) and p.weights == root
  assert p.model == transformer.Config.from_diffusers(
      json.load(open(os.path.join(GOLDEN_DIR, "transformer_t2v", "config.json"))))
  with pytest.raises(ConfigError, match="has boundary_ratio .* is wan2.1-t2v"):
    _plan(pretrained_model_name_or_path=root)  # a two-expert root with a one-expert config
  with pytest.raises(ConfigError, match="has no boundary_ratio"):
    _plan(wan22_t2v, pretrained_model_name_or_path=_a14b_root(tmp_path / "b", None))


def test_checkpoint_of_another_family_is_refused():
  with pytest.raises(ConfigError, match="the checkpoint at .*transformer_i2v does not fit the "
                                        "wan2.1-t2v family.*36 input"):
    _plan(pretrained_model_name_or_path=os.path.join(GOLDEN_DIR, "transformer_i2v"))
  with pytest.raises(ConfigError, match="48 input"):
    _plan(wan22_t2v, transformer_pretrained_model_name_or_path=os.path.join(GOLDEN_DIR,
                                                                           "transformer_ti2v"))
  assert _plan(wan22_ti2v, pretrained_model_name_or_path=os.path.join(
      GOLDEN_DIR, "transformer_ti2v")).model.in_channels == 48


def test_steps_schedule_and_scaled_lr():
  p = _plan(max_train_steps=100, warmup_steps_fraction=0.1, scale_lr=True, learning_rate=1e-4,
            global_batch_size=8)
  o = p.optimizer
  assert (p.num_steps, o.schedule_steps, o.warmup_steps) == (100, 100, 10)
  assert o.learning_rate == pytest.approx(8e-4)
  p = _plan(max_train_steps=0, synthetic_num_samples=10, num_train_epochs=3)
  assert p.num_steps == 3 * 5
  with pytest.raises(ConfigError, match="num_train_epochs=3 has no effect unless max_train_steps"):
    _plan(num_train_epochs=3)


def test_paths_are_made_absolute(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  p = _plan(output_dir="runs", jax_cache_dir="cache")
  assert p.outputs.run_dir == str(tmp_path / "runs" / "wan21_t2v_tiny")
  assert p.outputs.checkpoint_dir == str(tmp_path / "runs" / "wan21_t2v_tiny" / "checkpoints")
  assert p.outputs.jax_cache_dir == str(tmp_path / "cache")
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  assert _plan(output_dir="~/x").outputs.run_dir == str(tmp_path / "home" / "x" /
                                                        "wan21_t2v_tiny")
  assert not (tmp_path / "runs").exists()  # planning writes nothing


def test_unwritable_output_dir_is_refused_before_any_work(tmp_path):
  (tmp_path / "file").write_text("x")
  with pytest.raises(ConfigError, match="output_dir: .* cannot be written .* not a directory"):
    _plan(output_dir=str(tmp_path / "file" / "runs"))
  read_only = tmp_path / "ro"
  read_only.mkdir()
  read_only.chmod(0o500)
  try:
    if not os.access(read_only, os.W_OK):  # root may write anywhere
      with pytest.raises(ConfigError, match="not writable"):
        _plan(output_dir=str(read_only))
  finally:
    read_only.chmod(0o700)


def test_synthetic_num_samples_is_settable():
  c = wan21_t2v.get_config("tiny")
  c.synthetic_num_samples = 12  # a typed placeholder, not a bare None
  assert plan.make(c, plan.Devices(8)).data.num_samples == 12


# ---------------------------------------------------------------------------------------------
# Parameter placement: nothing large is silently whole on every device.


@pytest.mark.parametrize("devices", [12, 24])
def test_14b_never_replicates_a_large_parameter(devices):
  """Every mesh of 12 or 24 devices that the plan accepts for Wan 2.1 14B shards each parameter
  over 1 MiB along fsdp and tensor; fsdp sizes that cannot are refused, naming the parameter and
  the sizes that work. Abstract shapes only: nothing is initialised."""
  decls = transformer.declarations(transformer.PRESETS["wan2.1-t2v-14b"])
  accepted = 0
  for data in (d for d in range(1, devices + 1) if devices % d == 0):
    for tensor in (1, 2, 4):
      fsdp = devices // data // tensor
      if devices % (data * tensor):
        continue
      try:
        p = _plan(wan21_t2v, devices, platform="tpu", variant="14b", ici_data=data,
                  ici_fsdp=fsdp, ici_tensor=tensor, global_batch_size=data, height=480,
                  width=832)
      except ConfigError as e:
        assert fsdp % 3 == 0, (data, fsdp, tensor, e)  # 5120 = 2^10 * 5: 3 divides nothing
        assert re.search(r"parameter\(s\) would be whole on every device: .* \(40, 5120, 5120\)"
                         r".* has no dimension that fsdp=\d+ divides.*use fsdp = ", str(e)), e
        continue
      accepted += 1
      for r in params.placements(decls, p.mesh_shape, jnp.bfloat16):
        if r.nbytes > 2**20:  # split along fsdp (and tensor where the rules name it)
          assert not r.unplaced, (r.path, r.shape, r.spec)
          assert r.per_device_bytes(p.mesh_shape) <= r.nbytes / fsdp, r.path
  assert accepted >= 4


def test_fsdp_moves_to_a_dimension_it_divides():
  """TI2V 5B's FFN (3072, 14336) with fsdp 7: 3072 is not divisible, 14336 = 7 * 2048 is."""
  decls = transformer.declarations(transformer.PRESETS["wan2.2-ti2v-5b"])
  mesh = dict(data=1, fsdp=7, context=1, tensor=1)
  placed = {r.path: r for r in params.placements(decls, mesh, jnp.bfloat16)}
  fc1 = placed["blocks/ffn/fc1/kernel"]
  assert fc1.spec == jax.P(None, None, "fsdp") and not fc1.unplaced
  with pytest.raises(ConfigError, match="fsdp=7 divides"):
    _plan(wan22_ti2v, 7, platform="tpu", variant="5b", ici_fsdp=7, global_batch_size=7)


def test_plan_reports_parameter_bytes_and_replication():
  p = _plan(wan21_t2v, 8, platform="tpu", variant="14b")
  assert p.param_count == params.count(transformer.declarations(p.model))
  assert p.param_bytes_per_device < p.param_bytes / 7.9  # fsdp 8 shards nearly everything
  assert 0 < p.replicated_bytes < 1e-3 * p.param_bytes  # norms and biases only
  assert "per device" in p.summary() and "whole on every device" in p.summary()


def test_summary_says_where_fsdp_splits_the_tokens():
  """A batch smaller than data x fsdp leaves fsdp to each sample's tokens; a token count that
  fsdp does not divide either is said too (each fsdp device then computes every token)."""
  assert "tokens split" not in _plan(global_batch_size=8).summary()  # fsdp 8 splits the batch
  p = _plan(global_batch_size=4)
  assert p.split_axes == ((), ("fsdp",))
  assert "the batch of 4 is smaller than data x fsdp: each sample's 32 tokens split over fsdp 8" \
      in p.summary()
  p = _plan(global_batch_size=4, height=80, width=80)  # 2 x 5 x 5 = 50 tokens
  assert p.split_axes == ((), ())
  assert "fsdp 8 splits neither the batch of 4 nor the 50 tokens" in p.summary()
  p = _plan(global_batch_size=4, ici_data=2, ici_fsdp=4)
  assert p.split_axes == (("data",), ("fsdp",))


def test_docs_table_covers_every_field():
  doc = open(os.path.join(os.path.dirname(__file__), "..", "docs", "config.md")).read()
  documented = set(re.findall(r"^\|[^|]*\| `([a-z0-9_]+)` \|", doc, re.M))
  fields = set(base.get_config().keys())
  assert fields - documented == set(), "fields missing from docs/config.md"
  assert documented - fields == set(), "docs/config.md names fields that do not exist"


def test_single_replica_restore_is_a_checkpoint_setting():
  assert _plan(enable_single_replica_ckpt_restoring=True,
               checkpoint_every=2).outputs.single_replica_restore
  assert not _plan(checkpoint_every=2).outputs.single_replica_restore
  with pytest.raises(ConfigError, match="has no effect unless job=train with checkpoint_every"):
    _plan(enable_single_replica_ckpt_restoring=True, checkpoint_every=-1)
