"""LoRA: the three file formats against diffusers' own Wan LoRA loader, merging against float64
NumPy, reading other tools' spellings, and LoRA training (frozen base, adapters alone in the
optimizer, overfitting, exact resume, less memory than full fine-tuning, sharded).

tests/golden/lora/<case>/ holds LoRAs our trainer wrote (tools/lora_files.py, a few steps on
the tiny diffusers transformers of tests/golden/); tests/golden/lora/<case>.npz holds diffusers'
transformer output with each file loaded by `pipe.load_lora_weights` (tools/golden/lora.py).
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import wan21_t2v
from tests.conftest import GOLDEN_DIR
from wan import checkpoint, data, generate, lora, params, plan, train, transformer
from wan.errors import CheckpointError, ConfigError, MissingFile
from wan.weights import lora as lora_weights
from wan.weights import safetensors

CASES = {"t2v": 2.0, "i2v": 1.0}  # case: the alpha it trained with (rank 4)


def _golden(case):
  return np.load(os.path.join(GOLDEN_DIR, f"transformer_{case}.npz"))


def _forward(p, cfg, g):
  return np.asarray(transformer.forward(
      p, cfg, jnp.asarray(g["latents"]), jnp.asarray(g["timestep"]), jnp.asarray(g["text"]),
      jnp.asarray(g["image"]) if "image" in g else None))


def _rel(a, b):
  return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("fmt", sorted(lora_weights.FILES))
def test_merged_lora_equals_diffusers_with_the_file_loaded(case, fmt):
  cfg, base = transformer.load(os.path.join(GOLDEN_DIR, f"transformer_{case}"))
  adapters = lora.load(os.path.join(GOLDEN_DIR, "lora", case), lora_weights.FILES[fmt])
  g = _golden(case)
  want = np.load(os.path.join(GOLDEN_DIR, "lora", f"{case}.npz"))[fmt]
  assert _rel(want, g["output"]) > 0.1  # the LoRA changes the output: the check can fail
  assert _rel(_forward(lora.merge(base, adapters), cfg, g), want) <= 1e-5
  # The training path (adapters beside the frozen kernels) gives the same.
  assert _rel(_forward(lora.attach(base, adapters), cfg, g), want) <= 1e-5


@pytest.mark.parametrize("case", sorted(CASES))
def test_writer_reproduces_the_files_diffusers_was_checked_with(case, tmp_path):
  directory = os.path.join(GOLDEN_DIR, "lora", case)
  adapters = lora.load(directory)  # the diffusers file: lora_b carries alpha / rank
  alpha, rank = CASES[case], 4
  trained = jax.tree.map(lambda x: x, adapters)
  for path in lora.modules(trained):
    node = params.at(trained, path)
    node["lora_b"] = node["lora_b"] / (alpha / rank)
  lora.save(str(tmp_path / "out"), trained, alpha)
  for name in lora_weights.FILES.values():
    want = safetensors.read_file(os.path.join(directory, name))
    got = safetensors.read_file(tmp_path / "out" / name)
    assert sorted(got) == sorted(want), name
    for k in want:
      np.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=0, err_msg=k)


def test_file_names_are_each_tools_own():
  names = {fmt: set(safetensors.read_file(os.path.join(GOLDEN_DIR, "lora", "i2v", f)))
           for fmt, f in lora_weights.FILES.items()}
  assert "transformer.blocks.1.attn2.add_k_proj.lora_A.weight" in names["diffusers"]
  assert "transformer.blocks.0.ffn.net.0.proj.lora_B.weight" in names["diffusers"]
  assert not any(n.endswith("alpha") for n in names["diffusers"])
  assert {"diffusion_model.blocks.1.cross_attn.k_img.lora_A.weight",
          "diffusion_model.blocks.0.ffn.2.lora_B.weight",
          "diffusion_model.blocks.0.self_attn.o.alpha"} <= names["comfyui"]
  assert {"lora_unet_blocks_1_cross_attn_v_img.lora_down.weight",
          "lora_unet_blocks_0_ffn_0.lora_up.weight",
          "lora_unet_blocks_0_self_attn_q.alpha"} <= names["musubi"]
  # 12 linear layers x 2 blocks, 2 factors (+ alpha)
  assert len(names["diffusers"]) == 48 and len(names["comfyui"]) == len(names["musubi"]) == 72


def test_merge_equals_float64_numpy():
  rng = np.random.default_rng(0)
  cfg = transformer.PRESETS["tiny-t2v"]
  base = jax.device_get(transformer.init(cfg, jax.random.key(0)))
  settings = lora.Settings(3, 3.0, ("blocks/self_attn/q", "blocks/ffn/fc2"))
  adapters = jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32),
                          lora.init(cfg, settings, jax.random.key(1)))
  merged = lora.merge(base, adapters, scale=0.7)
  for path in ("blocks/self_attn/q", "blocks/ffn/fc2"):
    a = params.at(adapters, path)
    w = params.at(base, path)["kernel"].astype(np.float64)
    want = w + 0.7 * np.einsum("lir,lro->lio", a["lora_a"].astype(np.float64),
                               a["lora_b"].astype(np.float64))
    got = params.at(merged, path)["kernel"]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  # Everything else is the same arrays.
  np.testing.assert_array_equal(merged["blocks"]["self_attn"]["k"]["kernel"],
                                base["blocks"]["self_attn"]["k"]["kernel"])
  assert jax.tree.structure(merged) == jax.tree.structure(base)


def _write(path, tensors, metadata=None):
  safetensors.write_file(path, {k: np.asarray(v, np.float32) for k, v in tensors.items()},
                         metadata)


def test_reads_other_spellings_partial_blocks_and_mixed_ranks(tmp_path):
  rng = np.random.default_rng(1)
  a1, b1 = rng.normal(size=(2, 32)), rng.normal(size=(32, 2))  # rank 2
  a2, b2 = rng.normal(size=(3, 64)), rng.normal(size=(32, 3))  # rank 3
  # ComfyUI names with kohya's lora_down / lora_up; only block 1; alpha 1.
  _write(tmp_path / "comfy.safetensors", {
      "diffusion_model.blocks.1.self_attn.q.lora_down.weight": a1,
      "diffusion_model.blocks.1.self_attn.q.lora_up.weight": b1,
      "diffusion_model.blocks.1.self_attn.q.alpha": np.float32(1.0),
      "diffusion_model.blocks.0.ffn.2.lora_down.weight": a2,
      "diffusion_model.blocks.0.ffn.2.lora_up.weight": b2})  # no alpha: alpha = rank
  adapters = lora.load(str(tmp_path / "comfy.safetensors"))
  q = adapters["blocks"]["self_attn"]["q"]
  assert q["lora_a"].shape == (2, 32, 2)
  np.testing.assert_array_equal(q["lora_a"][0], 0)  # block 0 not in the file: no change
  np.testing.assert_allclose(q["lora_a"][1] @ q["lora_b"][1], (b1 @ a1).T * 0.5, rtol=1e-5, atol=1e-6)
  fc2 = adapters["blocks"]["ffn"]["fc2"]
  np.testing.assert_allclose(fc2["lora_a"][0] @ fc2["lora_b"][0], (b2 @ a2).T, rtol=1e-5, atol=1e-6)
  # PEFT names with a pipeline's metadata: lora_alpha 6 over rank 3.
  _write(tmp_path / "peft.safetensors", {
      "transformer.blocks.0.ffn.net.2.lora_A.weight": a2,
      "transformer.blocks.0.ffn.net.2.lora_B.weight": b2},
      {"lora_adapter_metadata": json.dumps({"transformer.r": 3, "transformer.lora_alpha": 6})})
  fc2 = lora.load(str(tmp_path / "peft.safetensors"))["blocks"]["ffn"]["fc2"]
  np.testing.assert_allclose(fc2["lora_a"][0] @ fc2["lora_b"][0], 2 * (b2 @ a2).T, rtol=1e-5, atol=1e-6)


def test_bad_lora_files_are_named(tmp_path):
  rng = np.random.default_rng(2)
  _write(tmp_path / "diff.safetensors", {
      "diffusion_model.blocks.0.self_attn.q.diff_b": rng.normal(size=(32,))})
  with pytest.raises(CheckpointError, match=r"not LoRA factors.*diff_b"):
    lora.load(str(tmp_path / "diff.safetensors"))
  _write(tmp_path / "half.safetensors", {
      "transformer.blocks.0.attn1.to_q.lora_A.weight": rng.normal(size=(2, 32))})
  with pytest.raises(CheckpointError, match="has only lora_A"):
    lora.load(str(tmp_path / "half.safetensors"))
  os.makedirs(tmp_path / "two")
  for name in ("a.safetensors", "b.safetensors"):
    _write(tmp_path / "two" / name, {"transformer.blocks.0.attn1.to_q.lora_A.weight":
                                     rng.normal(size=(2, 32))})
  with pytest.raises(MissingFile, match="set weight_name"):
    lora.load(str(tmp_path / "two"))
  (tmp_path / "cut.safetensors").write_bytes(b"\x10\x00")
  with pytest.raises(CheckpointError, match="truncated"):
    lora.load(str(tmp_path / "cut.safetensors"))
  cfg, base = transformer.load(os.path.join(GOLDEN_DIR, "transformer_t2v"))
  i2v = lora.load(os.path.join(GOLDEN_DIR, "lora", "i2v"))
  with pytest.raises(CheckpointError, match="cross_attn/k_img, which this model does not have"):
    lora.merge(base, i2v)  # an I2V LoRA on a T2V model


# ----------------------------------------------------------------------------------------------
# Training


def _tiny(**overrides):
  c = wan21_t2v.get_config("tiny")
  c.update(dict(checkpoint_every=-1, write_metrics=False, global_batch_size=2,
                enable_lora=True, learning_rate=1e-2))
  c.lora_config.rank = (4,)
  c.update(overrides)
  return c


def _run(c, devices=None):
  devices = jax.devices()[:1] if devices is None else devices
  return train.setup(plan.make(c, devices), devices)


def test_lora_step_trains_the_adapters_only():
  run = _run(_tiny())
  state = train.init_state(run)
  base = jax.device_get(state["base"])
  start = jax.device_get(state["params"])
  assert sorted(lora.modules(start)) == sorted(run.plan.lora.targets)
  assert jax.tree.structure(state["opt_state"]).num_leaves < 3 * len(jax.tree.leaves(start)) + 5
  batch = next(data.make(run.plan, run.mesh))
  step = train.make_step(run)
  with jax.set_mesh(run.mesh):
    for _ in range(2):
      state, _ = step(state, batch)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state["base"]), base)
  moved = jax.device_get(state["params"])
  assert all(np.abs(np.asarray(b["lora_b"])).max() > 0
             for b in (params.at(moved, p) for p in lora.modules(moved)))
  for leaf in jax.tree.leaves(state["opt_state"]):
    assert leaf.size <= max(x.size for x in jax.tree.leaves(start))


def test_lora_overfits_one_fixed_batch():
  run = _run(_tiny(disable_training_weights=True, global_batch_size=1))
  state = train.init_state(run)
  batch = next(data.make(run.plan, run.mesh))
  key = jax.random.key(7)  # the same noise and timesteps every step
  tx = optax.adam(3e-2)

  def loss(adapters):
    return train.loss_fn(train.model_params(run, dict(state, params=adapters)), batch, key,
                         run.plan)[0]

  @jax.jit
  def step(adapters, opt):
    value, grads = jax.value_and_grad(loss)(adapters)
    updates, opt = tx.update(grads, opt)
    return optax.apply_updates(adapters, updates), opt, value

  adapters = state["params"]
  opt = tx.init(adapters)
  losses = []
  for _ in range(100):
    adapters, opt, value = step(adapters, opt)
    losses.append(float(value))
  # The frozen output head maps the 32-wide residual stream to 64 values per token, so the
  # adapters cannot fit the target exactly (the loss settles at ~0.56 of its start whatever
  # the rank); full fine-tuning, which trains the head, goes below a tenth (test_train.py).
  assert losses[-1] < 0.65 * losses[0], (losses[0], losses[-1])


def test_lora_run_resumes_exactly_and_writes_lora_files(tmp_path):
  common = dict(checkpoint_every=2, output_dir=str(tmp_path / "a"))
  straight = train.train(plan.make(_tiny(max_train_steps=4, **common), jax.devices()[:1]),
                         jax.devices()[:1])
  other = dict(common, output_dir=str(tmp_path / "b"))
  first = train.train(plan.make(_tiny(max_train_steps=2, **other), jax.devices()[:1]),
                      jax.devices()[:1])
  rest = train.train(plan.make(_tiny(max_train_steps=4, **other), jax.devices()[:1]),
                     jax.devices()[:1])
  assert first + rest == straight
  run_dir = tmp_path / "a" / "wan21_t2v_tiny"
  # One folder per checkpoint, the newest checkpoints_to_keep (3) of them kept.
  assert sorted(os.listdir(run_dir / "lora")) == ["2", "3", "4"]
  assert sorted(os.listdir(run_dir / "lora" / "4")) == sorted(lora_weights.FILES.values())
  # The checkpoint holds the adapters alone (no frozen base): small.
  found = checkpoint.latest_params(str(run_dir / "checkpoints"),
                                   train.init_state(_run(_tiny()))["params"])
  assert found[0] == 4
  # The LoRA files of the last step are the checkpoint's adapters.
  files = lora.load(str(run_dir / "lora" / "4"))
  for path in lora.modules(files):
    got = params.at(files, path)
    want = params.at(found[1], path)
    np.testing.assert_allclose(got["lora_a"], want["lora_a"], rtol=1e-6)
    np.testing.assert_allclose(got["lora_b"], np.asarray(want["lora_b"]), rtol=1e-6)  # alpha=rank


def _memory(c):
  run = _run(c)
  state = jax.eval_shape(lambda: train.init_state(run))
  state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), state,
                       run.state_shardings)
  batch = next(data.make(run.plan, run.mesh))
  m = train.make_step(run).lower(state, batch).compile().memory_analysis()
  return m.argument_size_in_bytes + m.temp_size_in_bytes + m.output_size_in_bytes


def test_lora_step_needs_less_memory_than_full_fine_tuning():
  full = _memory(_tiny(enable_lora=False, lora_config=wan21_t2v.get_config("tiny").lora_config))
  with_lora = _memory(_tiny())
  assert with_lora < 0.75 * full, (with_lora, full)


def test_sharded_lora_step_equals_single_device():
  c = _tiny(precision="HIGHEST")
  want = _one_lora_step(c, jax.devices()[:1])
  got = _one_lora_step(_tiny(precision="HIGHEST", ici_fsdp=4, ici_tensor=2), jax.devices())
  assert abs(got[0] - want[0]) <= 1e-5 * abs(want[0])
  for a, b in zip(jax.tree.leaves(got[1]), jax.tree.leaves(want[1])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def _one_lora_step(c, devices):
  run = _run(c, devices)
  state = train.init_state(run)
  batch = next(data.make(run.plan, run.mesh))
  with jax.set_mesh(run.mesh):
    for _ in range(2):  # the second step moves lora_a too (lora_b is zero at the start)
      state, stats = train.make_step(run)(state, batch)
  return float(stats["loss"]), jax.device_get(state["params"])


def test_training_starts_from_a_lora_file_and_merges_the_others(tmp_path):
  base_dir = os.path.join(GOLDEN_DIR, "transformer_t2v")
  first = os.path.join(GOLDEN_DIR, "lora", "t2v")
  c = _tiny(transformer_pretrained_model_name_or_path=base_dir, lora_alpha=1.0)
  c.lora_config.lora_model_name_or_path = (first, first)
  c.lora_config.weight_name = ("comfyui.safetensors", "musubi.safetensors")
  c.lora_config.scale = (1.0, 0.5)
  run = _run(c)
  state = train.init_state(run)
  cfg, base = transformer.load(base_dir)
  loaded = lora.load(first)
  g = _golden("t2v")
  want = _forward(lora.merge(lora.merge(base, loaded), loaded, 0.5), cfg, g)
  got = _forward(jax.device_get(train.model_params(run, state)), cfg, g)
  assert _rel(got, want) <= 1e-5


def test_lora_config_refusals(tmp_path):
  devices = jax.devices()[:1]
  for overrides, match in [
      (dict(lora_targets="blocks/norm.*"), "matches none of the linear layers"),
      (dict(lora_targets="(("), "not a regular expression"),
      (dict(lora_alpha=-1.0), "lora_alpha"),
      (dict(enable_lora=False, lora_alpha=1.0), "no effect unless enable_lora=True"),
  ]:
    with pytest.raises(ConfigError, match=match):
      plan.make(_tiny(**overrides), devices)
  c = _tiny()
  c.lora_config.rank = (4, 8)
  with pytest.raises(ConfigError, match="give one rank .* or one per LoRA"):
    plan.make(c, devices)
  c = _tiny()  # a rank per LoRA: each file is checked against its entry
  c.lora_config.lora_model_name_or_path = (os.path.join(GOLDEN_DIR, "lora", "t2v"),) * 2
  c.lora_config.rank = (4, 8)
  run = train.setup(plan.make(c, devices), devices)
  with pytest.raises(CheckpointError, match="has rank 4, but its lora_config.rank entry is 8"):
    train.init_state(run)
  c = _tiny()
  c.lora_config.lora_model_name_or_path = (str(tmp_path / "nothing"),)
  with pytest.raises(ConfigError, match="does not exist"):
    plan.make(c, devices)
  c = _tiny()
  c.lora_config.lora_model_name_or_path = (os.path.join(GOLDEN_DIR, "lora", "t2v"),)
  c.lora_config.from_pt = (False,)
  with pytest.raises(ConfigError, match="from_pt=False"):
    plan.make(c, devices)
  c = _tiny()
  c.lora_config.weight_name = ("x.safetensors",)
  with pytest.raises(ConfigError, match="without lora_config.lora_model_name_or_path"):
    plan.make(c, devices)


def test_generate_merges_lora_files_and_the_runs_adapters(tmp_path):
  train.train(plan.make(_tiny(max_train_steps=2, checkpoint_every=2, output_dir=str(tmp_path)),
                        jax.devices()[:1]), jax.devices()[:1])
  c = _tiny(job="generate", prompt="a", num_inference_steps=2, output_dir=str(tmp_path))
  c.lora_config.lora_model_name_or_path = (os.path.join(GOLDEN_DIR, "lora", "t2v"),)
  c.lora_config.scale = (0.5,)
  gen = plan.generation(c, jax.devices()[:1])
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1, 1),
                           ("data", "fsdp", "context", "tensor"))
  pipe, tag = generate.build(gen, mesh)
  assert tag == "step_2"
  run = _run(_tiny())
  base = jax.device_get(train.init_state(run)["base"])  # the run's random base (seed)
  trained = checkpoint.latest_params(str(tmp_path / "wan21_t2v_tiny" / "checkpoints"),
                                     train.init_state(run)["params"])[1]
  want = lora.merge(lora.merge(base, lora.load(os.path.join(GOLDEN_DIR, "lora", "t2v")), 0.5),
                    jax.device_get(trained), run.plan.lora.scale)
  got = jax.device_get(pipe.experts["high_noise"])
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
