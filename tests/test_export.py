"""job=export: a full fine-tune of a Wan 2.2 A14B expert and a LoRA run written as diffusers
model roots (the other components copied from the base root), and the refusals.

That diffusers loads and runs such roots was checked with tools/check_export.py (docs/lora.md).
"""

import filecmp
import os

import jax
import numpy as np
import pytest

from configs import wan21_t2v, wan22_t2v
from tests import pipeline_roots
from tests.conftest import GOLDEN_DIR
from wan import checkpoint, export, lora, plan, train, transformer
from wan.errors import ConfigError, MissingFile


def _config(module, root, out, **fields):
  c = module.get_config("tiny")
  c.update(dict(checkpoint_every=1, write_metrics=False, global_batch_size=1, max_train_steps=2,
                pretrained_model_name_or_path=root, output_dir=str(out), learning_rate=1e-2))
  c.update(fields)
  return c


def _train(c):
  devices = jax.devices()[:1]
  train.train(plan.make(c, devices), devices)


def _export(c, export_dir, **fields):
  c = c.copy_and_resolve_references()
  c.update(dict(job="export", export_dir=str(export_dir), **fields))
  return export.run(plan.export(c, jax.devices()))


def _on_one_device(tree):
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), tree)


def test_full_fine_tune_of_the_low_noise_expert_exports_a_whole_root(tmp_path):
  root = pipeline_roots.tiny_root(tmp_path, two_experts=True)
  c = _config(wan22_t2v, root, tmp_path, expert="low_noise")
  _train(c)
  out = _export(c, tmp_path / "export")
  assert sorted(os.listdir(out)) == sorted(os.listdir(root))
  for name in ("model_index.json", "scheduler/scheduler_config.json", "vae/config.json",
               "transformer/diffusion_pytorch_model.safetensors", "tokenizer/tokenizer_config.json"):
    assert filecmp.cmp(os.path.join(root, name), os.path.join(out, name), shallow=False), name
  cfg, exported = transformer.load(out, expert="low_noise")
  step, trained = checkpoint.latest_params(str(tmp_path / "wan22_t2v_tiny" / "checkpoints"),
                                           _on_one_device(transformer.abstract(cfg)))
  assert step == 2
  jax.tree.map(np.testing.assert_array_equal, exported, jax.device_get(trained))
  _, before = transformer.load(root, expert="low_noise")
  assert not np.array_equal(before["blocks"]["ffn"]["fc1"]["kernel"],
                            exported["blocks"]["ffn"]["fc1"]["kernel"])


def test_lora_run_exports_its_files_and_the_merged_transformer(tmp_path):
  root = pipeline_roots.tiny_root(tmp_path, two_experts=False)
  c = _config(wan21_t2v, root, tmp_path, enable_lora=True)
  c.lora_config.rank = (4,)
  _train(c)
  only_lora = _export(c, tmp_path / "lora_only")
  assert os.listdir(only_lora) == ["lora"]
  out = _export(c, tmp_path / "merged", export_merged=True)
  assert sorted(os.listdir(out)) == sorted(os.listdir(root) + ["lora"])
  cfg, base = transformer.load(root)
  adapters = lora.load(os.path.join(out, "lora"))
  _, exported = transformer.load(out)
  want = lora.merge(base, adapters)
  for a, b in zip(jax.tree.leaves(exported), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  assert cfg.num_layers == 2


def test_export_refusals(tmp_path):
  root = pipeline_roots.tiny_root(tmp_path, two_experts=False)
  c = _config(wan21_t2v, root, tmp_path)
  with pytest.raises(MissingFile, match="holds no training checkpoint"):
    _export(c, tmp_path / "e1")
  with pytest.raises(ConfigError, match="set export_dir"):
    _export(c, "")
  (tmp_path / "full").mkdir()
  (tmp_path / "full" / "keep.txt").write_text("mine")
  with pytest.raises(ConfigError, match="not empty"):
    _export(c, tmp_path / "full")
  assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
  with pytest.raises(ConfigError, match="export_merged=True has no effect unless"):
    _export(c, tmp_path / "e2", export_merged=True)
  with pytest.raises(ConfigError, match="not a diffusers model root"):
    _export(_config(wan21_t2v, os.path.join(GOLDEN_DIR, "transformer_t2v"), tmp_path),
            tmp_path / "e3")
