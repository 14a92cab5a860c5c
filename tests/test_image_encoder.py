"""CLIP vision encoder vs transformers' CLIPVisionModel (golden files from tools/golden/image.py)."""

import os
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.conftest import GOLDEN_DIR
from wan import image_encoder
from wan import sharding
from wan.errors import CheckpointError
from wan.weights import safetensors

MODEL_DIR = os.path.join(GOLDEN_DIR, "clip_tiny")


@pytest.fixture(scope="module")
def golden():
  return np.load(os.path.join(GOLDEN_DIR, "clip_tiny.npz"))


@pytest.fixture(scope="module")
def loaded():
  return image_encoder.load(MODEL_DIR, precision="HIGHEST")


def _rel_err(x, ref):
  return float(np.abs(np.asarray(x, np.float64) - ref).max() / np.abs(ref).max())


def test_square_images_normalise_exactly_like_the_processor(golden, loaded):
  cfg, _ = loaded
  pixels = image_encoder.preprocess(jnp.asarray(golden["square"]), cfg)
  np.testing.assert_allclose(np.asarray(pixels).transpose(0, 3, 1, 2), golden["square_pixels"],
                             rtol=1e-6, atol=1e-6)


def test_resize_and_crop_within_one_8bit_level(golden, loaded):
  cfg, _ = loaded
  pixels = image_encoder.preprocess(jnp.asarray(golden["wide"]), cfg)
  assert pixels.shape == (1, 28, 28, 3)
  # transformers resamples 8-bit PIL images: one level is 1/255/std ~ 0.015 after normalising.
  err = np.abs(np.asarray(pixels).transpose(0, 3, 1, 2) - golden["wide_pixels"]).max()
  assert err <= 0.03, err


@pytest.mark.parametrize("scan_layers", [True, False])
def test_penultimate_and_last_match_transformers(golden, loaded, scan_layers):
  cfg, params = loaded
  cfg = image_encoder.Config(**{**cfg.__dict__, "scan_layers": scan_layers})
  out = jax.jit(image_encoder.encode, static_argnums=1)(params, cfg, jnp.asarray(golden["square"]))
  assert out.shape == (2, cfg.num_tokens, cfg.hidden_size) == (2, 17, 32)
  assert _rel_err(out, golden["penultimate"][:2]) <= 1e-5
  pixels = jnp.asarray(np.concatenate([golden["square_pixels"], golden["wide_pixels"]])
                       .transpose(0, 2, 3, 1))
  for layers, name in ((2, "penultimate"), (3, "last")):
    out = image_encoder.hidden_state(params, cfg, pixels, layers)
    assert _rel_err(out, golden[name]) <= 1e-5, name


def test_real_config_gives_257_tokens():
  out = jax.eval_shape(lambda p, x: image_encoder.encode(p, image_encoder.VIT_H_14, x),
                       image_encoder.abstract(image_encoder.VIT_H_14),
                       jax.ShapeDtypeStruct((1, 480, 832, 3), jnp.float32))
  assert out.shape == (1, 257, 1280)


def test_sharded_encode_equals_unsharded(golden, loaded):
  cfg, params = loaded
  images = jnp.asarray(golden["square"])
  encode = jax.jit(image_encoder.encode, static_argnums=1)
  expected = encode(params, cfg, images)
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "context": 1, "tensor": 2},
                            {"data": 1, "fsdp": 1, "context": 1, "tensor": 1})
  with jax.set_mesh(mesh):
    placed = jax.device_put(params, image_encoder.shardings(cfg, mesh))
    assert placed["layers"]["fc1"]["kernel"].sharding.spec == jax.P(None, "fsdp", "tensor")
    out = encode(placed, cfg, images)
  np.testing.assert_allclose(np.asarray(out), np.asarray(expected), rtol=1e-5, atol=1e-5)


def test_load_from_diffusers_root(tmp_path, loaded):
  shutil.copytree(MODEL_DIR, tmp_path / "image_encoder")
  os.makedirs(tmp_path / "image_processor")
  shutil.move(tmp_path / "image_encoder" / "preprocessor_config.json", tmp_path / "image_processor")
  cfg, params = image_encoder.load(str(tmp_path), precision="HIGHEST")
  assert cfg == loaded[0]
  jax.tree.map(np.testing.assert_array_equal, params, loaded[1])


def test_load_with_vision_model_prefix(tmp_path, loaded):
  # How transformers 4 (and so Wan's released image_encoder) names the tensors.
  path = _write_modified(tmp_path, lambda t: t.update(
      {"vision_model." + n: t.pop(n) for n in list(t)}))
  _, params = image_encoder.load(path)
  jax.tree.map(np.testing.assert_array_equal, params, loaded[1])


def _write_modified(tmp_path, edit):
  tensors = dict(safetensors.read_file(os.path.join(MODEL_DIR, "model.safetensors")))
  edit(tensors)
  safetensors.write_file(tmp_path / "model.safetensors", tensors)
  shutil.copy(os.path.join(MODEL_DIR, "config.json"), tmp_path / "config.json")
  return str(tmp_path)


def test_missing_tensor_is_named(tmp_path):
  name = "encoder.layers.1.self_attn.k_proj.bias"
  with pytest.raises(CheckpointError, match="missing tensor " + re.escape(name)):
    image_encoder.load(_write_modified(tmp_path, lambda t: t.pop(name)))


def test_wrong_shape_is_named(tmp_path):
  name = "embeddings.patch_embedding.weight"
  path = _write_modified(tmp_path, lambda t: t.update({name: np.zeros((32, 3, 8, 8), np.float32)}))
  with pytest.raises(CheckpointError, match=re.escape(name) + r".*\(32, 3, 8, 8\)"):
    image_encoder.load(path)


def test_unexpected_tensor_is_named(tmp_path):
  name = "encoder.layers.3.mlp.fc1.bias"
  path = _write_modified(tmp_path, lambda t: t.update({name: np.zeros(64, np.float32)}))
  with pytest.raises(CheckpointError, match="unexpected tensor " + re.escape(name)):
    image_encoder.load(path)


def test_unused_tensors_of_a_full_clip_model_are_ignored(tmp_path, loaded):
  # CLIPVisionModelWithProjection under vision_model.: post norm, position ids and projection.
  def edit(t):
    t.update({"vision_model." + n: t.pop(n) for n in list(t)})
    t["vision_model.post_layernorm.weight"] = np.ones(32, np.float32)
    t["vision_model.embeddings.position_ids"] = np.arange(17)[None]
    t["visual_projection.weight"] = np.zeros((8, 32), np.float32)
  _, params = image_encoder.load(_write_modified(tmp_path, edit))
  jax.tree.map(np.testing.assert_array_equal, params, loaded[1])
