"""The weights layer: safetensors files, model roots, JSON files, the one checker, buckets."""

import json
import os
import shutil
import struct
import uuid

import jax
import ml_dtypes
import numpy as np
import pytest

from tests.conftest import GOLDEN_DIR
from wan import fs, image_encoder, text_encoder, vae
from wan import params as params_lib
from wan import tokenizer as tokenizer_lib
from wan import transformer as T
from wan.errors import CheckpointError, ConfigError, MissingFile
from wan.weights import convert, roots, safetensors
from wan.weights import transformer as W

T2V = os.path.join(GOLDEN_DIR, "transformer_t2v")


# ----------------------------------------------------------------------------------------------
# safetensors


def test_bfloat16_round_trips_exactly(tmp_path):
  rng = np.random.default_rng(0)
  tensors = {"w": rng.normal(size=(3, 5)).astype(ml_dtypes.bfloat16),
             "b": rng.normal(size=(5,)).astype(np.float16), "i": np.arange(4, dtype=np.int64)}
  safetensors.write_file(tmp_path / "x.safetensors", tensors)
  back = safetensors.read_file(tmp_path / "x.safetensors")
  assert back["w"].dtype == ml_dtypes.bfloat16
  for name, t in tensors.items():
    assert back[name].dtype == t.dtype and back[name].shape == t.shape
    np.testing.assert_array_equal(back[name].view(np.uint8), t.view(np.uint8))
  assert os.listdir(tmp_path) == ["x.safetensors"]  # no temporary file left behind


def test_header_read_touches_no_tensor_data(tmp_path, monkeypatch):
  tensors = {"a": np.ones((64, 64), np.float32), "b": np.zeros((7,), ml_dtypes.bfloat16)}
  path = tmp_path / "x.safetensors"
  safetensors.write_file(path, tensors)
  header_len = struct.unpack("<Q", path.read_bytes()[:8])[0]
  read = []
  real_read = fs.read_bytes
  monkeypatch.setattr(fs, "read_bytes", lambda p, offset=0, length=None: read.append(
      (offset, length)) or real_read(p, offset, length))
  monkeypatch.setattr(np, "memmap", None)  # any attempt to map the data fails
  infos = safetensors.read_dir_header(tmp_path)
  assert {n: (i.dtype, i.shape) for n, i in infos.items()} == {
      "a": (np.dtype(np.float32), (64, 64)), "b": (np.dtype(ml_dtypes.bfloat16), (7,))}
  assert read == [(0, 8), (8, header_len)]


def _write_raw(path, header: dict, data: bytes = b""):
  blob = json.dumps(header).encode()
  path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)


@pytest.mark.parametrize("header, data, message", [
    ({"t": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8, "truncated"),
    ({"t": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}}, b"\0" * 8,
     "unsupported dtype C64"),
    ({"t": {"shape": [1]}}, b"", "corrupt safetensors header entry"),
])
def test_bad_files_are_errors_naming_the_file(tmp_path, header, data, message):
  path = tmp_path / "bad.safetensors"
  _write_raw(path, header, data)
  with pytest.raises(CheckpointError, match=f"{path}.*{message}"):
    safetensors.read_file(path)


def test_corrupt_and_short_headers_name_the_file(tmp_path):
  path = tmp_path / "bad.safetensors"
  path.write_bytes(struct.pack("<Q", 5) + b"{oops")
  with pytest.raises(CheckpointError, match=f"{path}: corrupt safetensors header"):
    safetensors.read_header(path)
  path.write_bytes(b"\1\2")
  with pytest.raises(CheckpointError, match=f"{path}: not a safetensors file"):
    safetensors.read_header(path)


def test_a_tensor_in_two_files_is_an_error(tmp_path):
  safetensors.write_file(tmp_path / "a.safetensors", {"x": np.zeros(2, np.float32)})
  safetensors.write_file(tmp_path / "b.safetensors", {"x": np.ones(2, np.float32),
                                                      "y": np.ones(1, np.float32)})
  with pytest.raises(CheckpointError, match=r"'x' is in both .*a\.safetensors and .*b\.safe"):
    safetensors.read_dir(tmp_path, "model")
  os.remove(tmp_path / "a.safetensors")
  assert sorted(safetensors.read_dir(tmp_path, "model")) == ["x", "y"]  # any *.safetensors


def test_sharded_directory_and_its_index_errors(tmp_path):
  tensors = {f"t{i}": np.full((10,), i, np.float32) for i in range(5)}
  safetensors.write_dir(tmp_path, tensors, "model", max_shard_bytes=80)
  index = tmp_path / "model.safetensors.index.json"
  assert index.exists() and len(list(tmp_path.glob("model-*-of-*.safetensors"))) == 3
  back = safetensors.read_dir(tmp_path, "model")
  jax.tree.map(np.testing.assert_array_equal, dict(back), tensors)
  raw = json.loads(index.read_text())
  raw["weight_map"]["t9"] = raw["weight_map"]["t0"]
  index.write_text(json.dumps(raw))
  with pytest.raises(CheckpointError, match=r"lists tensors that no shard holds: \['t9'\]"):
    safetensors.read_dir(tmp_path, "model")
  index.write_text("{not json")
  with pytest.raises(CheckpointError, match=f"{index} is not valid JSON"):
    safetensors.read_dir(tmp_path, "model")
  raw["weight_map"]["t9"] = "model-00009-of-00009.safetensors"
  index.write_text(json.dumps(raw))
  with pytest.raises(MissingFile, match="lists shard model-00009-of-00009.safetensors"):
    safetensors.read_dir(tmp_path, "model")


def test_directory_without_weights_says_what_it_wanted(tmp_path):
  with pytest.raises(MissingFile, match="holds no model.safetensors, no model.safetensors.index"):
    safetensors.read_dir(tmp_path, "model")


# ----------------------------------------------------------------------------------------------
# Roots and JSON files


def _component(path, *markers):
  os.makedirs(path, exist_ok=True)
  for m in markers or ("config.json",):
    (path / m).write_text("{}")
  return str(path)


def test_resolver_component_dir_itself_and_root_subfolders(tmp_path):
  vae_dir = _component(tmp_path / "vae")
  assert roots.resolve(vae_dir, "vae") == vae_dir
  assert roots.resolve(tmp_path, "vae") == vae_dir
  tok = _component(tmp_path / "tokenizer", "spiece.model")
  assert roots.resolve(tmp_path, "tokenizer") == tok
  assert roots.find(tmp_path, "image_encoder") is None


def test_resolver_transformer_experts(tmp_path):
  diffusers = tmp_path / "Wan2.2-T2V-A14B-Diffusers"
  high, low = _component(diffusers / "transformer"), _component(diffusers / "transformer_2")
  assert roots.resolve(diffusers, "transformer") == high
  assert roots.resolve(diffusers, "transformer", "low_noise") == low
  original = tmp_path / "Wan2.2-T2V-A14B"
  high, low = _component(original / "high_noise_model"), _component(original / "low_noise_model")
  assert roots.resolve(original, "transformer", "high_noise") == high
  assert roots.resolve(original, "transformer", "low_noise") == low
  # A transformer directory itself serves either expert.
  assert roots.resolve(high, "transformer", "low_noise") == high
  with pytest.raises(ConfigError, match="expert='mid' is not one of"):
    roots.resolve(original, "transformer", "mid")


def test_resolver_errors_name_the_path_and_what_was_expected(tmp_path):
  _component(tmp_path / "transformer")
  with pytest.raises(MissingFile, match=f"{tmp_path} holds no transformer for expert "
                                        "'low_noise': it holds no config.json, nor a "
                                        "transformer_2/ or low_noise_model/ subfolder"):
    roots.resolve(tmp_path, "transformer", "low_noise")
  with pytest.raises(MissingFile, match="neither tokenizer.json nor spiece.model, nor a "
                                        "tokenizer/ subfolder"):
    roots.resolve(tmp_path, "tokenizer")
  with pytest.raises(MissingFile, match=f"vae checkpoint directory {tmp_path}/nowhere does not"):
    roots.resolve(tmp_path / "nowhere", "vae")


def test_model_index(tmp_path):
  assert roots.model_index(tmp_path) is None
  (tmp_path / "model_index.json").write_text(json.dumps({"vae": ["diffusers", "AutoencoderKLWan"]}))
  assert roots.model_index(tmp_path) == {"vae": ["diffusers", "AutoencoderKLWan"]}
  (tmp_path / "model_index.json").write_text("[1, 2")
  with pytest.raises(CheckpointError, match="model_index.json is not valid JSON"):
    roots.model_index(tmp_path)


@pytest.mark.parametrize("load, source", [
    (T.load, "transformer_t2v"), (W.read_architecture, "transformer_t2v"),
    (vae.load, "vae_wan21"), (text_encoder.load, "umt5_tiny"), (image_encoder.load, "clip_tiny"),
])
def test_invalid_config_json_is_an_error_naming_the_file(tmp_path, load, source):
  shutil.copytree(os.path.join(GOLDEN_DIR, source), tmp_path / "model")
  config = tmp_path / "model" / "config.json"
  config.write_text('{"num_layers": 2,')
  with pytest.raises(CheckpointError, match=f"{config} is not valid JSON"):
    load(str(tmp_path / "model"))


# ----------------------------------------------------------------------------------------------
# The converter and its checker


def _decls():
  P = params_lib.Param
  layer = {"fc": {"kernel": P((4, 6), (None, None)), "bias": P((6,), (None,))}}
  return {"conv": {"kernel": P((3, 2, 2, 5, 4), (None,) * 5)},
          "norm": {"scale": P((4,), (None,))},
          "layers": params_lib.stack(layer, 2)}


def _name_map(decls):
  return {"conv/kernel": convert.Tensor("conv.weight", convert.conv((3, 2, 2, 5, 4))),
          "norm/scale": convert.Tensor("norm.gamma", convert.Layout((4, 1, 1, 1))),
          "layers/fc/kernel": convert.Tensor("blocks.{layer}.fc.weight", convert.linear((4, 6))),
          "layers/fc/bias": convert.Tensor("blocks.{layer}.fc.bias", convert.Layout((6,)))}


def test_layouts_convert_pytorch_tensors_both_ways():
  decls = _decls()
  rng = np.random.default_rng(1)
  theirs = {name: rng.normal(size=shape).astype(np.float32)
            for name, shape in convert.tensor_shapes(decls, _name_map(decls)).items()}
  assert theirs["conv.weight"].shape == (4, 5, 3, 2, 2)
  assert theirs["blocks.1.fc.weight"].shape == (6, 4)
  ours = convert.to_params(theirs, decls, _name_map(decls), np.float32, source="x", what="toy")
  np.testing.assert_array_equal(ours["conv"]["kernel"],
                                theirs["conv.weight"].transpose(2, 3, 4, 1, 0))
  np.testing.assert_array_equal(ours["layers"]["fc"]["kernel"][1], theirs["blocks.1.fc.weight"].T)
  np.testing.assert_array_equal(ours["norm"]["scale"], theirs["norm.gamma"].reshape(4))
  back = convert.to_tensors(ours, decls, _name_map(decls))
  jax.tree.map(np.testing.assert_array_equal, back, theirs)


def test_heads_split_by_the_reshape():
  # UMT5's q: PyTorch (H*K, D) -> ours (D, H, K); o: (D, H*K) -> (H, K, D).
  q = np.arange(6 * 4).reshape(6, 4)
  ours = convert.linear((4, 2, 3)).to_ours(q, (4, 2, 3))
  np.testing.assert_array_equal(ours, q.T.reshape(4, 2, 3))
  layout = convert.linear((2, 3, 4), in_dims=2)
  assert layout.shape == (4, 6)
  o = np.arange(24).reshape(4, 6)
  np.testing.assert_array_equal(layout.to_theirs(layout.to_ours(o, (2, 3, 4))), o)


def test_checker_reports_missing_misshaped_and_unexpected_together():
  decls = _decls()
  tensors = {name: np.zeros(shape, np.float32)
             for name, shape in convert.tensor_shapes(decls, _name_map(decls)).items()}
  del tensors["blocks.1.fc.bias"]
  tensors["norm.gamma"] = np.zeros((4,), np.float32)
  tensors["extra.weight"] = np.zeros(1, np.float32)
  tensors["skipped.weight"] = np.zeros(1, np.float32)
  with pytest.raises(CheckpointError) as e:
    convert.to_params(tensors, decls, _name_map(decls), np.float32, source="/ckpt/dir",
                      what="toy", ignore=(r"skipped\.",))
  message = str(e.value)
  assert message.startswith("/ckpt/dir does not match the toy declarations (3 problem(s))")
  assert "missing tensor blocks.1.fc.bias (expected shape (6,))" in message
  assert "tensor norm.gamma has shape (4,), expected (4, 1, 1, 1)" in message
  assert "unexpected tensor extra.weight" in message and "skipped" not in message


def test_transformer_tensor_shapes_are_pytorch_shapes():
  cfg = T.Config.from_diffusers(W.read_architecture(T2V))
  shapes = W.tensor_shapes(T.declarations(cfg))
  assert shapes["patch_embedding.weight"] == (32, 16, 1, 2, 2)
  assert shapes["blocks.1.scale_shift_table"] == (1, 6, 32)
  assert shapes["blocks.0.attn1.to_q.weight"] == (32, 32)
  assert shapes["proj_out.weight"] == (64, 32)
  on_disk = safetensors.read_dir_header(T2V, W.STEM)
  assert shapes == {n: i.shape for n, i in on_disk.items()}


# ----------------------------------------------------------------------------------------------
# Bucket paths (tf.io.gfile's in-memory ram:// file system stands in for gs://)


@pytest.fixture
def bucket():
  root = f"ram://wan-test-{uuid.uuid4().hex}"
  fs.makedirs(root)
  yield root
  fs.rmtree(root)


def test_safetensors_through_a_bucket_path(bucket):
  tensors = {"w": np.arange(12, dtype=np.float32).reshape(3, 4).astype(ml_dtypes.bfloat16)}
  path = fs.join(bucket, "x.safetensors")
  safetensors.write_file(path, tensors)
  assert fs.listdir(bucket) == ["x.safetensors"]
  assert safetensors.read_header(path)["w"].shape == (3, 4)
  np.testing.assert_array_equal(safetensors.read_file(path)["w"], tensors["w"])


def test_transformer_saves_and_loads_on_a_bucket(bucket):
  cfg, p = T.load(T2V)
  root = fs.join(bucket, "Wan2.1-T2V-Diffusers")
  T.save(fs.join(root, "transformer"), cfg, p, max_shard_bytes=20_000)
  assert W.STEM + ".safetensors.index.json" in fs.listdir(fs.join(root, "transformer"))
  jax.tree.map(np.testing.assert_array_equal, T.load(root)[1], p)
  T.save(fs.join(root, "transformer"), cfg, p)  # replaces the sharded one
  assert fs.listdir(root) == ["transformer"]
  assert fs.listdir(fs.join(root, "transformer")) == ["config.json", W.STEM + ".safetensors"]
  cfg2, p2 = T.load(root)
  assert cfg2 == cfg
  jax.tree.map(np.testing.assert_array_equal, p2, p)
  assert W.read_architecture(root) == cfg.to_diffusers()


def test_tokenizer_loads_from_a_bucket(bucket):
  for name in ("spiece.model", "tokenizer.json"):
    with open(os.path.join(GOLDEN_DIR, "spiece_tiny", name), "rb") as f:
      data = f.read()
    with fs.open_file(fs.join(bucket, "tokenizer", name), "wb") as f:
      f.write(data)
  local = tokenizer_lib.load(os.path.join(GOLDEN_DIR, "spiece_tiny"))
  remote = tokenizer_lib.load(bucket)
  np.testing.assert_array_equal(remote(["a cat in the rain"], 16)[0],
                                local(["a cat in the rain"], 16)[0])


# ----------------------------------------------------------------------------------------------
# Sharded loading: each process converts only the parts of the weights its devices hold


def _mesh():
  from wan import sharding
  return sharding.make_mesh({"data": 1, "fsdp": 4, "context": 1, "tensor": 2},
                            {"data": 1, "fsdp": 1, "context": 1, "tensor": 1}, jax.devices())


def test_a_sharded_load_places_each_leaf_like_the_host_load(tmp_path):
  cfg, host = T.load(T2V, ml_dtypes.bfloat16)
  mesh = _mesh()
  cfg2, placed = T.load(T2V, ml_dtypes.bfloat16, mesh=mesh)
  assert cfg2 == cfg
  want = T.shardings(cfg, mesh)
  split = 0
  for a, b, s in zip(jax.tree.leaves(placed), jax.tree.leaves(host), jax.tree.leaves(want)):
    assert isinstance(a, jax.Array) and a.sharding == s and a.dtype == b.dtype
    np.testing.assert_array_equal(np.asarray(a), b)
    split += a.addressable_shards[0].data.size < a.size
  assert split > 10  # most kernels are split over fsdp and tensor


def test_a_sharded_load_from_a_bucket_reads_each_tensor_once(bucket, monkeypatch):
  cfg, host = T.load(T2V)
  T.save(fs.join(bucket, "transformer"), cfg, host, max_shard_bytes=50_000)
  reads = []
  real_read = fs.read_bytes
  monkeypatch.setattr(fs, "read_bytes", lambda p, offset=0, length=None: reads.append(
      length) or real_read(p, offset, length))
  _, placed = T.load(fs.join(bucket, "transformer"), mesh=_mesh())
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), placed, host)
  files = [n for n in fs.listdir(fs.join(bucket, "transformer")) if n.endswith(".safetensors")]
  assert len(files) > 1
  data = sum(x.nbytes for x in jax.tree.leaves(host))
  tensors = len(W.tensor_shapes(T.declarations(cfg)))
  # Per file: its header length (8 bytes) and header, then one read per tensor, nothing twice.
  assert len([n for n in reads if n != 8]) == len(files) + tensors
  assert None not in reads  # no file read to its end
  assert sum(n for n in reads if n != 8) <= data + 4096 * len(files)
