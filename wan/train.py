"""The training loop: sharded rectified-flow training of one Wan transformer.

Data flow of one step (all inside one jit with explicit shardings; the state is donated):
  batch (global arrays) + key(seed, step) -> sigma, noise -> x_t (+ I2V conditioning)
  -> transformer.forward -> velocity loss (optionally bell-weighted) -> grads -> AdamW
"""

import contextlib
import dataclasses
import time

import jax
import jax.numpy as jnp
import optax

from wan import checkpoint, config, data, flow, fs, metrics, optim, params, sharding
from wan import transformer


def use_compilation_cache(path: str):
  """Caches every compiled program under `path` ("" turns the cache off) for later processes."""
  from jax.experimental.compilation_cache import compilation_cache
  jax.config.update("jax_compilation_cache_dir", path or None)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0 if path else 1.0)
  compilation_cache.reset_cache()  # the next compilation opens the cache at the new path


@dataclasses.dataclass(frozen=True)
class Run:
  """Everything fixed for a run: config, plan, mesh, optimizer and shardings."""
  c: object
  plan: config.Plan
  mesh: jax.sharding.Mesh
  tx: optax.GradientTransformation
  state_shardings: dict
  run_dir: str


def setup(c, devices=None) -> Run:
  """Validates the config against `devices` (default: all) and builds the run's fixed parts."""
  devices = list(jax.devices() if devices is None else devices)
  num_processes = len({d.process_index for d in devices})
  plan = config.plan(c, len(devices), num_processes, sharding.granules(devices)[1])
  if plan.model.attention == "cudnn_flash_te" and devices[0].platform != "gpu":
    raise ValueError(f"attention=cudnn_flash_te runs cuDNN flash attention on NVIDIA GPUs; these "
                     f"devices are {devices[0].platform}: use attention=flash (or ring, "
                     "dot_product)")
  mesh = sharding.make_mesh(plan.ici, plan.dcn, devices)
  tx = optim.make(c, plan)
  decls = transformer.param_decls(plan.model)
  param_shardings = params.shardings(decls, mesh)
  abstract_params = transformer.abstract(plan.model)
  replicated = jax.NamedSharding(mesh, jax.P())
  opt_shardings = optax.tree_map_params(
      tx, lambda _, s: s, jax.eval_shape(tx.init, abstract_params), param_shardings,
      transform_non_params=lambda _: replicated)
  state_shardings = {"step": replicated, "params": param_shardings, "opt_state": opt_shardings}
  return Run(c, plan, mesh, tx, state_shardings, fs.join(c.output_dir, c.run_name))


def init_state(run: Run) -> dict:
  """Step 0: pretrained (or randomly initialised) params and a fresh optimizer state."""
  c, plan = run.c, run.plan
  if c.pretrained_model_name_or_path or c.transformer_pretrained_model_name_or_path:
    path = c.transformer_pretrained_model_name_or_path or c.pretrained_model_name_or_path
    _, host = transformer.load(path, transformer.DTYPES[c.weights_dtype], expert=c.expert)
    p = jax.device_put(host, run.state_shardings["params"])
  else:
    p = jax.jit(lambda k: transformer.init(plan.model, k),
                out_shardings=run.state_shardings["params"])(jax.random.key(c.seed))
  opt_state = jax.jit(run.tx.init, out_shardings=run.state_shardings["opt_state"])(p)
  step = jax.device_put(jnp.zeros((), jnp.int32), run.state_shardings["step"])
  return {"step": step, "params": p, "opt_state": opt_state}


def _scope(c, name):
  return jax.named_scope(name) if c.enable_jax_named_scopes else contextlib.nullcontext()


def model_inputs(plan: config.Plan, batch: dict, x_t, sigma):
  """(model input latents, timestep, loss mask or None) for the run's conditioning."""
  t = flow.NUM_TRAIN_TIMESTEPS * sigma
  if plan.conditioning == "concat":  # noisy (C) + mask (4) + condition latents (C)
    return jnp.concatenate([x_t, batch["cond_mask"].astype(x_t.dtype),
                            batch["cond"].astype(x_t.dtype)], axis=-1), t, None
  if plan.conditioning == "first_frame":  # TI2V: clean first frame with timestep 0
    x_t = x_t.at[:, 0].set(batch["latents"][:, 0].astype(x_t.dtype))
    f, h, w, _ = plan.latent_shape
    _, ph, pw = plan.model.patch_size  # temporal patch 1 (checked by wan.config)
    noisy = jnp.arange(plan.seq_len) >= (h // ph) * (w // pw)  # tokens are frame-major
    return x_t, t[:, None] * noisy[None, :], jnp.arange(f) > 0
  return x_t, t, None


def loss_fn(p, batch: dict, key, run: Run):
  """Mean (weighted) squared velocity error of one global batch; returns (loss, sigma)."""
  c, plan = run.c, run.plan
  sigma_key, noise_key, caption_key, dropout_key = jax.random.split(key, 4)
  x0 = batch["latents"].astype(jnp.float32)
  b = x0.shape[0]
  sigma = flow.sample_sigmas(sigma_key, b, sampling=c.timestep_sampling, mean=c.logit_mean,
                             std=c.logit_std, flow_shift=c.flow_shift,
                             sigma_range=plan.sigma_range)
  noise = jax.random.normal(noise_key, x0.shape, jnp.float32)
  x_t = flow.noisy(x0, noise, sigma)
  x_in, t, frame_mask = model_inputs(plan, batch, x_t, sigma)
  text, text_mask = batch["text"], batch["text_mask"]
  if c.caption_dropout > 0:  # an all-padding (zero) caption, for classifier-free guidance
    drop = jax.random.bernoulli(caption_key, c.caption_dropout, (b,))
    text = jnp.where(drop[:, None, None], 0.0, text)
    text_mask = text_mask | drop[:, None]
  with _scope(c, "forward"):
    dtype = transformer.DTYPES[c.activations_dtype]
    pred = transformer.forward(p, plan.model, x_in.astype(dtype), t, text.astype(dtype),
                               batch.get("image"), text_mask=text_mask,
                               dropout_rng=dropout_key if c.dropout > 0 else None)
  with _scope(c, "loss"):
    err = jnp.square(pred.astype(jnp.float32) - flow.velocity(x0, noise))
    if frame_mask is None:
      per_sample = err.mean(axis=(1, 2, 3, 4))
    else:
      per_sample = (err.mean(axis=(2, 3, 4)) * frame_mask).sum(1) / frame_mask.sum()
    if not c.disable_training_weights:
      per_sample = per_sample * flow.bell_weight(sigma, c.flow_shift)
  return per_sample.mean(), sigma


def make_step(run: Run):
  """The jitted train step: (state, batch) -> (state, metrics); the state is donated."""
  c = run.c
  schedule = optim.schedule(run.plan, c.lr_schedule)

  def step(state, batch):
    key = jax.random.fold_in(jax.random.key(c.seed), state["step"])
    with _scope(c, "grad"):
      (loss, sigma), grads = jax.value_and_grad(loss_fn, has_aux=True)(
          state["params"], batch, key, run)
    with _scope(c, "optimizer"):
      updates, opt_state = run.tx.update(grads, state["opt_state"], state["params"])
      new_params = optax.apply_updates(state["params"], updates)
    new = {"step": state["step"] + 1, "params": new_params, "opt_state": opt_state}
    stats = {"loss": loss, "grad_norm": optax.tree.norm(grads),
             "learning_rate": schedule(state["step"]), "sigma_mean": sigma.mean()}
    return new, stats

  replicated = jax.NamedSharding(run.mesh, jax.P())
  return jax.jit(step, in_shardings=(run.state_shardings, data.batch_shardings(run.plan, run.mesh)),
                 out_shardings=(run.state_shardings, replicated), donate_argnums=0)


class _Profiler:
  """Traces steps [first + skip, first + skip + profiler_steps) into {run_dir}/profile."""

  def __init__(self, c, run_dir, first):
    self._on = c.enable_profiler
    self._start = first + c.skip_first_n_steps_for_profiler
    self._stop = self._start + c.profiler_steps
    self._dir = fs.join(run_dir, "profile")
    self._tracing = False

  def before_step(self, step):
    if self._on and step == self._start:
      jax.profiler.start_trace(self._dir)
      self._tracing = True
    elif self._tracing and step == self._stop:
      self.stop()

  def stop(self):
    if self._tracing:
      jax.profiler.stop_trace()
      self._tracing = False


def train(c, devices=None) -> list[float]:
  """Runs (or resumes) training as configured; returns the losses of the steps it ran."""
  run = setup(c, devices)
  plan = run.plan
  state = init_state(run)
  it = data.make(c, plan, run.mesh)
  ckpt = None
  first = 0
  if c.checkpoint_every > 0:
    ckpt = checkpoint.Checkpointer(c.checkpoint_dir or fs.join(run.run_dir, "checkpoints"),
                                   c.checkpoints_to_keep, c.save_optimizer)
    latest = ckpt.latest_step()
    if latest is not None:
      state, data_state = ckpt.restore(latest, state)
      it.restore(data_state)
      first = latest
      print(f"resumed from step {latest}", flush=True)
  step_fn = make_step(run)
  writer = metrics.Writer(run.run_dir, plan.num_steps, c.write_metrics,
                          c.tensorboard_flush_period)
  f, h, w, _ = plan.latent_shape
  flops = 3 * transformer.flops(plan.model, plan.global_batch, f, h, w, plan.text_len,
                                plan.image_len, per_token_timestep=plan.conditioning == "first_frame")
  devices = run.mesh.devices.size
  peak = metrics.peak_tflops(run.mesh.devices.flat[0])
  losses, saved = [], first
  profiler = _Profiler(c, run.run_dir, first)
  with jax.set_mesh(run.mesh):
    for step in range(first, plan.num_steps):
      profiler.before_step(step)
      start = time.perf_counter()
      state, stats = step_fn(state, next(it))
      stats = jax.device_get(stats)
      elapsed = time.perf_counter() - start
      losses.append(float(stats["loss"]))
      tflops = flops / elapsed / devices / 1e12
      if (step + 1) % c.log_every == 0 or step + 1 == plan.num_steps:
        writer.write(step + 1, {**stats, "step_time": elapsed, "tflops_per_device": tflops,
                                "mfu": tflops / peak if peak else None,
                                "samples_per_second": plan.global_batch / elapsed}, first)
      if ckpt and ((step + 1) * plan.global_batch // c.checkpoint_every >
                   step * plan.global_batch // c.checkpoint_every):
        ckpt.save(step + 1, state, it.state())
        saved = step + 1
    if ckpt and saved != plan.num_steps and plan.num_steps > first:
      ckpt.save(plan.num_steps, state, it.state())
  profiler.stop()
  writer.close()
  if ckpt:
    ckpt.close()
  return losses

