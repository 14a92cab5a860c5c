"""Loading and saving transformer checkpoints.

tests/golden/transformer_t2v_saved/ was written by our `save` from the diffusers-made
tests/golden/transformer_t2v/ and then checked to load in diffusers with the golden output
(`python tools/golden/transformer.py --check-saved tests/golden/transformer_t2v_saved`, exact
match). `test_save_is_what_diffusers_was_checked_to_load` keeps our writer byte-identical to it.
"""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from tests.conftest import GOLDEN_DIR
from wan import transformer as T
from wan.errors import CheckpointError, ConfigError, MissingFile
from wan.weights import safetensors
from wan.weights import transformer as W

T2V = os.path.join(GOLDEN_DIR, "transformer_t2v")


def _equal(a, b):
  jax.tree.map(np.testing.assert_array_equal, a, b)


def test_round_trip_keeps_params_and_diffusers_names(tmp_path):
  cfg, p = T.load(T2V)
  T.save(tmp_path / "out", cfg, p)
  cfg2, p2 = T.load(str(tmp_path / "out"))
  assert cfg2 == cfg
  _equal(p, p2)
  theirs = safetensors.read_dir(T2V, W.STEM)
  ours = safetensors.read_dir(tmp_path / "out", W.STEM)
  assert sorted(ours) == sorted(theirs)
  for k in theirs:
    np.testing.assert_array_equal(ours[k], theirs[k])
  with open(os.path.join(T2V, "config.json")) as f:
    want = json.load(f)
  with open(tmp_path / "out" / "config.json") as f:
    got = json.load(f)
  for k in W.FIELDS:
    assert got[k] == want[k], k


def test_save_is_what_diffusers_was_checked_to_load(tmp_path):
  cfg, p = T.load(T2V)
  T.save(tmp_path / "out", cfg, p)
  name = "diffusion_pytorch_model.safetensors"
  with open(tmp_path / "out" / name, "rb") as a, \
      open(os.path.join(GOLDEN_DIR, "transformer_t2v_saved", name), "rb") as b:
    assert a.read() == b.read()


def test_sharded_save_writes_index_and_reloads(tmp_path):
  cfg, p = T.load(T2V)
  T.save(tmp_path / "out", cfg, p, max_shard_bytes=20_000)
  files = os.listdir(tmp_path / "out")
  assert "diffusion_pytorch_model.safetensors.index.json" in files
  assert sum(f.endswith(".safetensors") for f in files) > 2
  _equal(T.load(str(tmp_path / "out"))[1], p)


def test_save_replaces_atomically_and_keeps_old_on_failure(tmp_path, monkeypatch):
  cfg, p = T.load(T2V)
  T.save(tmp_path / "out", cfg, p)
  def broken(*args, **kwargs):
    raise OSError("disk full")
  monkeypatch.setattr(safetensors, "write_dir", broken)
  with pytest.raises(OSError, match="disk full"):
    T.save(tmp_path / "out", cfg, jax.tree.map(lambda a: a * 0, p))
  _equal(T.load(str(tmp_path / "out"))[1], p)  # the earlier model is intact
  assert os.listdir(tmp_path) == ["out"]  # no temporary directory left behind


def _copy_with(tmp_path, edit):
  out = tmp_path / "edited"
  shutil.copytree(T2V, out)
  tensors = dict(safetensors.read_dir(out, W.STEM))
  edit(tensors)
  safetensors.write_file(out / "diffusion_pytorch_model.safetensors", tensors)
  return str(out)


def test_missing_tensor_is_named(tmp_path):
  path = _copy_with(tmp_path, lambda t: t.pop("blocks.1.ffn.net.2.weight"))
  with pytest.raises(CheckpointError, match=r"missing tensor blocks\.1\.ffn\.net\.2\.weight"):
    T.load(path)


def test_misshaped_tensor_is_named_with_expected_shape(tmp_path):
  def edit(t):
    t["proj_out.weight"] = np.zeros((3, 32), np.float32)
  with pytest.raises(CheckpointError,
                     match=r"proj_out\.weight has shape \(3, 32\), expected \(64, 32\)"):
    T.load(_copy_with(tmp_path, edit))


def test_unexpected_tensor_is_named(tmp_path):
  def edit(t):
    t["blocks.0.attn1.extra.weight"] = np.zeros((2,), np.float32)
  with pytest.raises(CheckpointError, match=r"unexpected tensor blocks\.0\.attn1\.extra\.weight"):
    T.load(_copy_with(tmp_path, edit))


def test_corrupt_file_is_a_clear_error(tmp_path):
  out = tmp_path / "corrupt"
  shutil.copytree(T2V, out)
  with open(out / "diffusion_pytorch_model.safetensors", "r+b") as f:
    f.truncate(2000)
  with pytest.raises(CheckpointError, match="truncated|corrupt"):
    T.load(str(out))


def test_a14b_root_picks_expert_directories(tmp_path):
  cfg, p = T.load(T2V)
  root = tmp_path / "Wan2.2-T2V-A14B-Diffusers"
  T.save(root / "transformer", cfg, p)
  T.save(root / "transformer_2", cfg, jax.tree.map(lambda a: a + 1, p))
  _equal(T.load(str(root))[1], p)
  _equal(T.load(str(root), expert="low_noise")[1], jax.tree.map(lambda a: a + 1, p))
  with pytest.raises(ConfigError, match="expert='mid'"):
    T.load(str(root), expert="mid")
  with pytest.raises(MissingFile, match="does not exist"):
    T.load(str(tmp_path / "nowhere"))


def test_prefixed_names_and_norm_added_q_load_the_same_params(tmp_path):
  # ComfyUI-style files prefix every name; some diffusers files carry an unused norm_added_q.
  def edit(t):
    t.update({"model.diffusion_model." + n: t.pop(n) for n in list(t)})
    t["blocks.0.attn2.norm_added_q.weight"] = np.ones(32, np.float32)
  _equal(T.load(_copy_with(tmp_path, edit))[1], T.load(T2V)[1])


def test_architecture_without_tensor_data_matches_load():
  cfg, _ = T.load(T2V)
  assert T.Config.from_diffusers(W.read_architecture(T2V)) == cfg
