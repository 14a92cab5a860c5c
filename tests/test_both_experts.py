"""expert=both: the two Wan 2.2 A14B experts in one run. Each step trains the expert of its noise
level only (the other keeps its parameters and optimizer state bit for bit), both losses are in
the metrics, per-expert learning rates, exact resume, LoRA files per expert, generation and
export of both."""

import json
import os

import jax
import numpy as np
import pytest

from configs import wan22_t2v
from tests import pipeline_roots
from wan import data, export, generate, lora, plan, train, transformer
from wan.errors import ConfigError


def _tiny(**overrides):
  c = wan22_t2v.get_config("tiny")
  c.update(dict(checkpoint_every=-1, write_metrics=False, global_batch_size=2, expert="both",
                learning_rate=1e-2, learning_rate_low_noise=1e-3, warmup_steps_fraction=0.0))
  c.update(overrides)
  return c


def _devices():
  return jax.devices()[:1]


def test_each_step_trains_one_expert_on_its_side_of_the_boundary():
  run = train.setup(plan.make(_tiny(), _devices()), _devices())
  state = train.init_state(run)
  it = data.make(run.plan, run.mesh)
  step = train.make_step(run)
  seen = set()
  with jax.set_mesh(run.mesh):
    for _ in range(8):
      before = jax.tree.map(np.array, state)  # copies: the step donates the state's buffers
      state, stats = step(state, next(it))
      after = jax.tree.map(np.array, state)
      high = bool(stats["expert_high"])
      trained, kept = ("high_noise", "low_noise") if high else ("low_noise", "high_noise")
      seen.add(trained)
      for part in ("params", "opt_state"):
        jax.tree.map(np.testing.assert_array_equal, after[part][kept], before[part][kept])
      moved = [not np.array_equal(a, b) for a, b in zip(
          jax.tree.leaves(after["params"][trained]), jax.tree.leaves(before["params"][trained]))]
      assert any(moved)
      b = run.plan.boundary
      assert (float(stats["sigma_mean"]) >= b) == high
      assert float(stats["learning_rate"]) == pytest.approx(1e-2 if high else 1e-3)
  assert seen == {"high_noise", "low_noise"}


def test_metrics_carry_both_losses_and_resume_is_exact(tmp_path):
  common = dict(checkpoint_every=2, write_metrics=True, output_dir=str(tmp_path / "a"))
  straight = train.train(plan.make(_tiny(max_train_steps=8, **common), _devices()), _devices())
  rows = [json.loads(line) for line in open(tmp_path / "a" / "wan22_t2v_tiny" / "metrics.jsonl")]
  assert {"loss_high_noise", "loss_low_noise"} <= set().union(*rows)
  for r in rows:  # exactly one of them, equal to the step's loss
    (name,) = [k for k in r if k.startswith("loss_")]
    assert r[name] == r["loss"]
  other = dict(common, output_dir=str(tmp_path / "b"))
  first = train.train(plan.make(_tiny(max_train_steps=4, **other), _devices()), _devices())
  rest = train.train(plan.make(_tiny(max_train_steps=8, **other), _devices()), _devices())
  assert first + rest == straight


def test_lora_both_writes_files_per_expert_and_exports_both(tmp_path):
  root = pipeline_roots.tiny_root(tmp_path, two_experts=True)
  c = _tiny(enable_lora=True, max_train_steps=6, checkpoint_every=6, output_dir=str(tmp_path),
            pretrained_model_name_or_path=root)
  c.lora_config.rank = (4,)
  train.train(plan.make(c, _devices()), _devices())
  run_dir = tmp_path / "wan22_t2v_tiny"
  assert sorted(os.listdir(run_dir / "lora" / "6")) == ["high_noise", "low_noise"]
  files = {name: lora.load(str(run_dir / "lora" / "6" / name)) for name in ("high_noise",
                                                                            "low_noise")}
  e = c.copy_and_resolve_references()
  e.update(dict(job="export", export_dir=str(tmp_path / "export"), export_merged=True))
  out = export.run(plan.export(e, jax.devices()))
  assert sorted(os.listdir(os.path.join(out, "lora"))) == ["high_noise", "low_noise"]
  for name, folder in (("high_noise", "transformer"), ("low_noise", "transformer_2")):
    _, base = transformer.load(root, expert=name)
    _, exported = transformer.load(os.path.join(out, folder))
    want = lora.merge(base, files[name])
    for a, b in zip(jax.tree.leaves(exported), jax.tree.leaves(want)):
      np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  # Generation takes both trained experts from the run.
  g = c.copy_and_resolve_references()
  # (The root's VAE does not fit the tiny transformer: the built-in tiny encoders sample.)
  g.update(dict(job="generate", prompt="a", num_inference_steps=2,
                pretrained_model_name_or_path="", transformer_pretrained_model_name_or_path=root))
  gen = plan.generation(g, jax.devices())
  pipe, tag = generate.build(gen, jax.sharding.Mesh(
      np.array(jax.devices()).reshape(1, -1, 1, 1), ("data", "fsdp", "context", "tensor")))
  assert tag == "step_6"
  for name, folder in (("high_noise", "transformer"), ("low_noise", "transformer_2")):
    _, exported = transformer.load(os.path.join(out, folder))
    for a, b in zip(jax.tree.leaves(jax.device_get(pipe.experts[name])),
                    jax.tree.leaves(exported)):
      np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_both_is_refused_for_one_expert_models_and_its_fields_are_gated():
  from configs import wan21_t2v  # pylint: disable=import-outside-toplevel
  c = wan21_t2v.get_config("tiny")
  c.expert = "both"
  with pytest.raises(ConfigError, match="applies only to the two-expert"):
    plan.make(c, _devices())
  with pytest.raises(ConfigError, match="learning_rate_low_noise=.* no effect unless expert=both"):
    plan.make(_tiny(expert="high_noise"), _devices())
