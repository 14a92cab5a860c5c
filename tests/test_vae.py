"""Wan VAE: parity with diffusers' AutoencoderKLWan (golden files), streaming, loading, sharding."""

import dataclasses
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tests.conftest import GOLDEN_DIR
from wan import sharding, vae
from wan.errors import CheckpointError
from wan.weights import convert, safetensors
from wan.weights import vae as vae_weights

KINDS = ("wan21", "wan22")


def _golden_dir(kind):
  return os.path.join(GOLDEN_DIR, f"vae_{kind}")


@pytest.fixture(scope="module", params=KINDS)
def golden(request):
  path = _golden_dir(request.param)
  cfg, params = vae.load(path)
  return cfg, params, dict(np.load(os.path.join(path, "golden.npz")))


def _channels_last(x):
  """(B, C, F, H, W) as diffusers stores it -> (B, F, H, W, C), float32."""
  return jnp.asarray(x.astype(np.float32).transpose(0, 2, 3, 4, 1))


def _rel_err(ours, ref):
  return float(np.max(np.abs(np.asarray(ours, np.float64) - ref)) / np.max(np.abs(ref)))


def test_encode_matches_diffusers(golden):
  cfg, params, g = golden
  mean = vae.encode(params, cfg, _channels_last(g["video"]))
  assert _rel_err(mean, g["mean"].transpose(0, 2, 3, 4, 1)) <= 1e-4


def test_decode_matches_diffusers(golden):
  cfg, params, g = golden
  video = vae.decode(params, cfg, _channels_last(g["latents"]))
  assert _rel_err(video, g["decoded"].transpose(0, 2, 3, 4, 1)) <= 1e-4


def test_streaming_is_causal():
  """The latents of the first 1 + 4j frames do not depend on later frames: encoding a prefix of
  the video gives the prefix of the latents (the chunk cache carries only the past)."""
  cfg, params = vae.load(_golden_dir("wan21"))
  video = _channels_last(np.load(os.path.join(_golden_dir("wan21"), "golden.npz"))["video"])
  full = vae.encode(params, cfg, video)
  prefix = vae.encode(params, cfg, video[:, :5])
  np.testing.assert_allclose(prefix, full[:, :2], rtol=1e-5, atol=1e-6)


def test_normalize_matches_pipeline_convention():
  with open(os.path.join(_golden_dir("wan22"), "config.json")) as f:
    config = json.load(f)
  cfg = vae.Config.from_diffusers(config)
  x = np.random.default_rng(0).normal(size=(2, 3, 2, 2, cfg.z_dim))
  mean, std = np.asarray(config["latents_mean"]), np.asarray(config["latents_std"])
  normed = vae.normalize(cfg, jnp.asarray(x, jnp.float32))
  np.testing.assert_allclose(normed, (x - mean) / std, rtol=1e-5, atol=1e-6)
  # diffusers' Wan pipelines decode `latents / (1 / std) + mean`.
  np.testing.assert_allclose(vae.denormalize(cfg, jnp.asarray(x, jnp.float32)),
                             x / (1.0 / std) + mean, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(vae.denormalize(cfg, normed), x, rtol=1e-5, atol=1e-5)


def _scan_bodies(jaxpr):
  """All `scan` equations in a (closed) jaxpr, searched through nested sub-jaxprs."""
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "scan":
      found.append(eqn)
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        if hasattr(sub, "eqns"):
          found.extend(_scan_bodies(sub))
        elif hasattr(sub, "jaxpr") and hasattr(sub.jaxpr, "eqns"):
          found.extend(_scan_bodies(sub.jaxpr))
  return found


def test_encode_streams_chunks_with_bounded_memory():
  cfg = vae.PRESETS["tiny2.1"]
  params = vae.abstract(cfg)
  sizes = {}
  for frames in (9, 33):
    video = jax.ShapeDtypeStruct((1, frames, 16, 24, 3), jnp.float32)
    jaxpr = jax.make_jaxpr(lambda p, v: vae.encode(p, cfg, v))(params, video)
    (scan,) = _scan_bodies(jaxpr.jaxpr)
    assert scan.params["length"] == (frames - 1) // 4
    # Each step reads one 4-frame chunk, whatever the video length.
    chunk = scan.invars[-1].aval.shape
    assert chunk == ((frames - 1) // 4, 1, 4, 16, 24, 3)
    compiled = jax.jit(vae.encode, static_argnums=1).lower(params, cfg, video).compile()
    sizes[frames] = compiled.memory_analysis().temp_size_in_bytes
  # 4x the frames: temporaries grow only by the (small) output and input copies, not 4x.
  print("encode temporaries (bytes) by frame count:", sizes)
  assert sizes[33] < 1.5 * sizes[9], sizes


def test_decode_streams_one_latent_frame_per_step():
  cfg = vae.PRESETS["tiny2.2"]
  params = vae.abstract(cfg)
  latents = jax.ShapeDtypeStruct((1, 4, 2, 3, cfg.z_dim), jnp.float32)
  jaxpr = jax.make_jaxpr(lambda p, z: vae.decode(p, cfg, z))(params, latents)
  (scan,) = _scan_bodies(jaxpr.jaxpr)
  assert scan.params["length"] == 3
  assert jax.eval_shape(lambda p, z: vae.decode(p, cfg, z), params, latents).shape == (
      1, 13, 32, 48, 3)


def test_input_validation_says_what_to_change():
  cfg = vae.PRESETS["tiny2.1"]
  params = vae.abstract(cfg)
  with pytest.raises(ValueError, match="1 \\+ 4k frames: use 5 or 9"):
    jax.eval_shape(lambda p, v: vae.encode(p, cfg, v), params,
                   jax.ShapeDtypeStruct((1, 8, 16, 16, 3), jnp.float32))
  with pytest.raises(ValueError, match="not divisible by the spatial factor 8"):
    jax.eval_shape(lambda p, v: vae.encode(p, cfg, v), params,
                   jax.ShapeDtypeStruct((1, 5, 20, 16, 3), jnp.float32))
  with pytest.raises(ValueError, match="4 channels but this VAE takes 3"):
    jax.eval_shape(lambda p, v: vae.encode(p, cfg, v), params,
                   jax.ShapeDtypeStruct((1, 5, 16, 16, 4), jnp.float32))
  with pytest.raises(ValueError, match="latents must be"):
    jax.eval_shape(lambda p, z: vae.decode(p, cfg, z), params,
                   jax.ShapeDtypeStruct((1, 2, 2, 2, 5), jnp.float32))


def _write_variant(tmp_path, kind, edit):
  src = _golden_dir(kind)
  dst = tmp_path / kind
  dst.mkdir()
  shutil.copy(os.path.join(src, "config.json"), dst / "config.json")
  tensors = dict(safetensors.read_file(os.path.join(src, "diffusion_pytorch_model.safetensors")))
  edit(tensors)
  safetensors.write_file(dst / "diffusion_pytorch_model.safetensors", tensors)
  return dst


def test_load_accepts_model_root_with_vae_subdir(tmp_path):
  shutil.copytree(_golden_dir("wan21"), tmp_path / "vae")
  cfg, params = vae.load(str(tmp_path))
  ref_cfg, ref = vae.load(_golden_dir("wan21"))
  assert cfg == ref_cfg
  assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), params, ref))


def test_load_errors_name_the_tensor(tmp_path):
  name = "decoder.up_blocks.1.resnets.0.conv1.weight"
  missing = _write_variant(tmp_path, "wan21", lambda t: t.pop(name))
  with pytest.raises(CheckpointError, match=f"missing.*{name}.*expected shape"):
    vae.load(str(missing))

  def reshape(t):
    t["encoder.down_blocks.0.resnets.0.conv1.weight"] = np.zeros((4, 4, 3, 3, 2), np.float16)
  wrong = _write_variant(tmp_path, "wan22", reshape)
  with pytest.raises(CheckpointError, match=r"down_blocks.0.resnets.0.conv1.weight has shape "
                                            r"\(4, 4, 3, 3, 2\), expected \(4, 4, 3, 3, 3\)"):
    vae.load(str(wrong))


def test_sharded_encode_and_decode_equal_unsharded():
  """A batch of 8 split over (data, fsdp) = (2, 4) fake devices, one video per device."""
  cfg, params = vae.load(_golden_dir("wan21"))
  video = jax.random.uniform(jax.random.key(2), (8, 5, 16, 24, 3), jnp.float32, -1, 1)
  expected = vae.encode(params, cfg, video)
  mesh = sharding.make_mesh({"data": 2, "fsdp": 4, "context": 1, "tensor": 1},
                            {"data": 1, "fsdp": 1, "context": 1, "tensor": 1})
  params = vae.replicate_vae(params, cfg, mesh)
  out = vae.encode(params, cfg, vae.shard_batch(video, mesh))
  assert out.sharding.spec[0] == ("data", "fsdp")
  assert out.addressable_shards[0].data.shape[0] == 1
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
  decoded = vae.decode(params, cfg, out)
  assert decoded.sharding.spec[0] == ("data", "fsdp")
  # The per-device program fuses (and so sums in float32) in another order: a few elements of
  # the decoded video differ by ~3e-6.
  np.testing.assert_allclose(decoded, vae.decode(params, cfg, jax.device_get(out)),
                             rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def released_keys():
  with open(os.path.join(GOLDEN_DIR, "vae_keys.json")) as f:
    return json.load(f)


@pytest.mark.parametrize("preset", ["wan2.1", "wan2.2"])
def test_released_presets_match_diffusers_tensors(preset, released_keys):
  """Every tensor of the released diffusers checkpoints, by name and PyTorch shape."""
  cfg = vae.PRESETS[preset]
  shapes = vae_weights.tensor_shapes(vae.declarations(cfg), cfg)
  assert {name: list(shape) for name, shape in shapes.items()} == released_keys[preset]


def test_released_wan21_original_names(released_keys):
  cfg = vae.PRESETS["wan2.1"]
  diffusers_to_original = released_keys["wan2.1_original"]
  for path, _ in convert.leaves(vae.declarations(cfg)):
    diffusers_name = vae_weights.checkpoint_name(path, cfg)
    assert vae_weights.checkpoint_name(path, cfg, original=True) == (
        diffusers_to_original[diffusers_name])


def test_released_wan22_original_names():
  # Names as they appear in Wan-AI's Wan2.2_VAE.pth (grouped per stage, unlike Wan 2.1).
  cfg = vae.PRESETS["wan2.2"]
  names = {t.name for t in vae_weights.names(vae.declarations(cfg), cfg, original=True).values()}
  for name in ("encoder.downsamples.0.downsamples.0.residual.2.weight",
               "encoder.downsamples.1.downsamples.0.shortcut.weight",
               "encoder.downsamples.0.downsamples.2.resample.1.weight",
               "encoder.downsamples.1.downsamples.2.time_conv.weight",
               "decoder.upsamples.0.upsamples.3.time_conv.weight",
               "decoder.middle.1.to_qkv.weight", "encoder.head.2.weight", "conv1.weight"):
    assert name in names


def test_load_original_wan21_file(tmp_path):
  """An original-layout (Wan-AI) file of the tiny 2.1 model loads to the same parameters."""
  src = _golden_dir("wan21")
  with open(os.path.join(src, "original_names.json")) as f:
    to_original = json.load(f)
  tensors = safetensors.read_file(os.path.join(src, "diffusion_pytorch_model.safetensors"))
  path = str(tmp_path / "Wan2.1_VAE.safetensors")
  safetensors.write_file(path, {to_original[k]: v for k, v in tensors.items()})
  cfg, ref = vae.load(src)
  with pytest.raises(CheckpointError, match="pass its Config"):
    vae.load(path)
  _, params = vae.load(path, config=cfg)
  assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), params, ref))


def test_tiled_encode_decode_match_diffusers_tiling():
  """Spatial tiling (Wan 2.2: tiles cut in patchified pixels) with diffusers' tiles and blends."""
  path = _golden_dir("wan22")
  cfg, params = vae.load(path)
  g = np.load(os.path.join(path, "golden.npz"))
  tiled = lambda size, stride: dataclasses.replace(
      cfg, use_tiling=True, tile_sample_min_height=size, tile_sample_min_width=size,
      tile_sample_stride_height=stride, tile_sample_stride_width=stride)
  mean = vae.encode(params, tiled(16, 8), _channels_last(g["video"]))
  assert _rel_err(mean, g["mean_tiled"].transpose(0, 2, 3, 4, 1)) <= 1e-4
  video = vae.decode(params, tiled(32, 16), _channels_last(g["latents"]))
  assert _rel_err(video, g["decoded_tiled"].transpose(0, 2, 3, 4, 1)) <= 1e-4


def test_bfloat16_runtime_stays_close_to_float32_reference():
  """The bf16 path (bf16 weights and activations, float32 accumulation and norms) runs and
  stays within bf16 rounding of the float32 golden (max error under 10% of the largest value
  after ~30 layers of random weights; measured about 2-5%)."""
  path = _golden_dir("wan22")
  cfg, params = vae.load(path, dtype="bfloat16")
  g = np.load(os.path.join(path, "golden.npz"))
  mean = vae.encode(params, cfg, _channels_last(g["video"]))
  assert mean.dtype == jnp.bfloat16
  assert _rel_err(mean.astype(jnp.float32), g["mean"].transpose(0, 2, 3, 4, 1)) <= 0.1
