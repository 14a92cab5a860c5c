"""UMT5 encoder vs transformers' UMT5EncoderModel (golden files from tools/golden/text.py)."""

import os
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.conftest import GOLDEN_DIR
from wan import sharding
from wan import text_encoder
from wan.errors import CheckpointError
from wan.weights import safetensors

MODEL_DIR = os.path.join(GOLDEN_DIR, "umt5_tiny")
TOKENIZER_DIR = os.path.join(GOLDEN_DIR, "spiece_tiny")


@pytest.fixture(scope="module")
def golden():
  return np.load(os.path.join(GOLDEN_DIR, "umt5_tiny.npz"))


@pytest.fixture(scope="module")
def loaded():
  cfg, params, _ = text_encoder.load(MODEL_DIR, tokenizer_path=TOKENIZER_DIR,
                                     precision="HIGHEST")
  return cfg, params


def _rel_err(x, ref):
  return float(np.abs(np.asarray(x, np.float64) - ref).max() / np.abs(ref).max())


def test_relative_position_buckets_match_transformers(golden):
  # umt5-xxl's bucket settings; every relative position of a 512-token prompt is in the table.
  span = (len(golden["buckets"]) - 1) // 2
  table = text_encoder.relative_position_buckets(span + 1, 32, 128)
  relative = np.arange(span + 1)[None, :] - np.arange(span + 1)[:, None]
  np.testing.assert_array_equal(table, golden["buckets"][relative + span])


@pytest.mark.parametrize("scan_layers", [True, False])
def test_encode_matches_transformers_and_zeroes_padding(golden, loaded, scan_layers):
  cfg, params = loaded
  cfg = text_encoder.Config(**{**cfg.__dict__, "scan_layers": scan_layers})
  assert cfg.num_layers == 3 and cfg.gated
  out = jax.jit(text_encoder.encode, static_argnums=1)(
      params, cfg, jnp.asarray(golden["token_ids"]), jnp.asarray(golden["mask"]))
  assert out.shape == golden["hidden"].shape
  assert _rel_err(out, golden["hidden"]) <= 1e-5
  padded = ~golden["mask"]
  assert padded.any() and (np.asarray(out)[padded] == 0).all()


def test_sharded_encode_equals_unsharded(golden, loaded):
  cfg, params = loaded
  ids, mask = jnp.asarray(golden["token_ids"][:2]), jnp.asarray(golden["mask"][:2])
  encode = jax.jit(text_encoder.encode, static_argnums=1)
  expected = encode(params, cfg, ids, mask)
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "context": 1, "tensor": 2},
                            {"data": 1, "fsdp": 1, "context": 1, "tensor": 1})
  with jax.set_mesh(mesh):
    placed = jax.device_put(params, text_encoder.shardings(cfg, mesh))
    assert placed["layers"]["q"]["kernel"].sharding.spec == jax.P(None, "fsdp", "tensor", None)
    out = encode(placed, cfg, ids, mask)
  np.testing.assert_allclose(np.asarray(out), np.asarray(expected), rtol=1e-5, atol=1e-5)


def test_load_from_diffusers_root(tmp_path, loaded):
  shutil.copytree(MODEL_DIR, tmp_path / "text_encoder")
  shutil.copytree(TOKENIZER_DIR, tmp_path / "tokenizer")
  cfg, params, tok = text_encoder.load(str(tmp_path), precision="HIGHEST")
  assert cfg == loaded[0]
  jax.tree.map(np.testing.assert_array_equal, params, loaded[1])
  ids, mask = tok(["a cat"], 8)
  assert ids.shape == (1, 8) and mask.sum() > 1


def _write_modified(tmp_path, edit):
  tensors = dict(safetensors.read_file(os.path.join(MODEL_DIR, "model.safetensors")))
  edit(tensors)
  safetensors.write_file(tmp_path / "model.safetensors", tensors)
  shutil.copy(os.path.join(MODEL_DIR, "config.json"), tmp_path / "config.json")
  return str(tmp_path)


def test_missing_tensor_is_named(tmp_path):
  name = "encoder.block.1.layer.1.DenseReluDense.wi_1.weight"
  path = _write_modified(tmp_path, lambda t: t.pop(name))
  with pytest.raises(CheckpointError, match="missing tensor " + re.escape(name)):
    text_encoder.load(path, tokenizer_path=TOKENIZER_DIR)


def test_wrong_shape_is_named(tmp_path):
  name = "encoder.block.2.layer.0.SelfAttention.relative_attention_bias.weight"
  path = _write_modified(tmp_path, lambda t: t.update({name: np.zeros((16, 4), np.float32)}))
  with pytest.raises(CheckpointError, match=re.escape(name) + r".*\(16, 4\)"):
    text_encoder.load(path, tokenizer_path=TOKENIZER_DIR)


def test_unexpected_tensor_is_named(tmp_path):
  path = _write_modified(tmp_path, lambda t: t.update(
      {"encoder.block.3.layer.0.layer_norm.weight": np.ones(32, np.float32)}))
  with pytest.raises(CheckpointError,
                     match=r"unexpected tensor encoder\.block\.3\.layer\.0\.layer_norm\.weight"):
    text_encoder.load(path, tokenizer_path=TOKENIZER_DIR)


def test_encoder_decoder_checkpoint_loads_the_encoder(tmp_path, loaded):
  # UMT5ForConditionalGeneration files: tied embed_tokens copies, decoder and LM head, all unused.
  def edit(t):
    t["encoder.embed_tokens.weight"] = t["shared.weight"]
    t["decoder.block.0.layer.0.layer_norm.weight"] = np.ones(32, np.float32)
    t["lm_head.weight"] = t["shared.weight"]
  _, params, _ = text_encoder.load(_write_modified(tmp_path, edit), tokenizer_path=TOKENIZER_DIR,
                                   precision="HIGHEST")
  jax.tree.map(np.testing.assert_array_equal, params, loaded[1])


def test_all_problems_are_reported_together(tmp_path):
  def edit(t):
    t.pop("encoder.final_layer_norm.weight")
    t["encoder.block.0.layer.0.SelfAttention.q.weight"] = np.zeros((3, 3), np.float32)
    t["encoder.extra.weight"] = np.zeros(2, np.float32)
  with pytest.raises(CheckpointError) as e:
    text_encoder.load(_write_modified(tmp_path, edit), tokenizer_path=TOKENIZER_DIR)
  message = str(e.value)
  assert str(tmp_path) in message and "3 problem(s)" in message
  assert "missing tensor encoder.final_layer_norm.weight (expected shape (32,))" in message
  assert "SelfAttention.q.weight has shape (3, 3), expected (32, 32)" in message
  assert "unexpected tensor encoder.extra.weight" in message
