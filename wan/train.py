"""The training loop: sharded rectified-flow training of one Wan transformer, from a Plan.

Data flow of one step (all inside one jit with explicit shardings; the state is donated):
  batch (global arrays) + key(seed, step) -> sigma, noise -> x_t -> conditioning.model_inputs
  -> transformer.forward -> velocity loss (optionally bell-weighted) -> grads -> AdamW
A LoRA run (plan.lora) trains the adapters alone: the state's "params" are the adapters, its
"base" the frozen transformer (passed through the step, never differentiated nor saved in a
checkpoint: a restart reads it again), and the forward runs lora.attach(base, adapters).
Packed batches (pack_sequences=True, wan/data/batch.py) take the same path in token space: one
sigma per clip, packing.model_inputs, transformer.forward_packed, one loss per clip
(packing.segment_mean), the mean over the batch's clips.

An expert=both run (Wan 2.2 A14B) holds both experts and trains the one of each step's noise
level. Non-finite steps are skipped and counted; SIGTERM / SIGINT save at a step boundary
(wan/guards.py, docs/reliability.md).

The loop never waits for the host between steps: step N+1 is dispatched before step N's metrics
are read, and step time is the time between completions.
"""

import contextlib
import dataclasses
import math

import jax
import jax.numpy as jnp
import optax

from wan import (attention, checkpoint, conditioning, data, evaluate, experts, flow, fs, guards,
                 lora, memory, metrics, numerics, optim, params as params_lib, quant, remat,
                 sharding, transformer)
from wan.data import batch as batch_lib
from wan.data import packing
from wan.errors import ConfigError
from wan.numerics import DTYPES
from wan.plan import Plan


EXPERTS = experts.EXPERTS


@dataclasses.dataclass(frozen=True)
class Run:
  """What a run fixes before its first step: plan, mesh, optimizer and state shardings.

  An expert=both run (Wan 2.2 A14B) keeps a tree per expert ({"high_noise": ...,
  "low_noise": ...}) wherever a one-expert run keeps one: params, opt_state, base, and tx."""
  plan: Plan
  mesh: jax.sharding.Mesh
  tx: optax.GradientTransformation | dict
  state_shardings: dict
  # remat_policy=AUTO: the chosen train step, compiled (for the plan's batch shapes) while
  # choosing; the loop runs it rather than compiling the same program again.
  compiled_step: object = None


def per_expert(plan: Plan, make):
  """make(expert) for a one-expert run; {expert: make(expert)} for expert=both."""
  if plan.expert == "both":
    return {name: make(name) for name in EXPERTS}
  return make(plan.expert)


def trained_declarations(plan: Plan):
  """The declarations of what one expert's optimizer trains: the transformer, or a LoRA run's
  adapters."""
  if plan.lora:
    return lora.declarations(plan.model, plan.lora)
  return transformer.declarations(plan.model)


def _optimizer(plan: Plan, expert: str):
  if expert == "low_noise" and plan.optimizer_low_noise is not None:
    return optim.make(plan.optimizer_low_noise)
  return optim.make(plan.optimizer)


def setup(plan: Plan, devices=None, memory_limit: float | None = None) -> Run:
  """The mesh of `plan` on `devices` (default: all) and the shardings of the train state.

  remat_policy=AUTO is resolved here: the Run's plan holds the policy chosen for `memory_limit`
  bytes per device (default: what the devices have, `memory.device_limit`)."""
  devices = list(jax.devices() if devices is None else devices)
  mesh = sharding.make_mesh(plan.ici, plan.dcn, devices)
  decls = trained_declarations(plan)
  param_shardings = params_lib.shardings(decls, mesh)
  abstract_params = params_lib.abstract(decls, DTYPES[plan.options.weights_dtype])
  replicated = jax.NamedSharding(mesh, jax.P())
  txs = {name: _optimizer(plan, name) for name in EXPERTS}
  opt_shardings = per_expert(plan, lambda name: optax.tree_map_params(
      txs[name], lambda _, s: s, jax.eval_shape(txs[name].init, abstract_params),
      param_shardings, transform_non_params=lambda _: replicated))
  tx = per_expert(plan, txs.get)
  state_shardings = {"step": replicated, "params": per_expert(plan, lambda _: param_shardings),
                     "opt_state": opt_shardings}
  if plan.lora:
    base_shardings = transformer.shardings(plan.model, mesh)
    q = plan.options.quantization
    if q is not None:  # the frozen base stored quantized
      base_shardings = quant.shardings(base_shardings, _abstract_base(plan))
    state_shardings["base"] = per_expert(plan, lambda _: base_shardings)
  run = Run(plan, mesh, tx, state_shardings)
  if plan.options.remat_policy == "AUTO":
    run = _choose_remat(run, memory.device_limit(devices) if memory_limit is None
                        else memory_limit)
  return run


def with_remat(run: Run, policy: str, saved=()) -> Run:
  """`run` with another remat policy (nothing else of a Run depends on it); saved: CUSTOM's
  names_which_can_be_saved."""
  options = dataclasses.replace(run.plan.options, remat_policy=policy,
                                names_which_can_be_saved=tuple(saved),
                                names_which_can_be_offloaded=())
  return dataclasses.replace(run, plan=dataclasses.replace(run.plan, options=options))


def lower_step(run: Run):
  """`run`'s train step lowered for the plan's batch shapes (the abstract state and batch)."""
  with jax.set_mesh(run.mesh):
    return make_step(run).lower(abstract_state(run), batch_lib.abstract(run.plan, run.mesh))


def compile_step(run: Run) -> tuple:
  """(`run`'s train step compiled for the plan's batch shapes, or None where the compiler
  refused it for memory; its per-device memory.Need)."""
  return memory.compile_need(lower_step(run))


def _choose_remat(run: Run, limit: float) -> Run:
  """The first rung of remat.auto_ladder (least recomputation first) whose compiled step fits
  `limit` bytes per device."""
  opts = run.plan.options
  flash_kernels = opts.attention in attention.PALLAS and attention.runs_kernel(
      opts.attention, run.plan.seq_len, opts.flash_min_seq_length)
  needs = {}
  for policy, saved in remat.auto_ladder(flash_kernels):
    name = remat.describe(policy, saved)
    candidate = with_remat(run, policy, saved)
    compiled, needs[name] = compile_step(candidate)
    if needs[name].fits(limit):
      metrics.log(f"remat_policy=AUTO: {name}, the step needs {needs[name].describe()} of "
                  f"{limit / memory.GIB:.1f} GiB per device"
                  + "".join(f"; {p} needs {n.describe()}" for p, n in needs.items() if p != name))
      return dataclasses.replace(candidate, compiled_step=compiled)
  raise memory.DoesNotFit(
      f"remat_policy=AUTO: no policy fits {limit / memory.GIB:.1f} GiB per device ("
      + ", ".join(f"{p} needs {n.describe()}" for p, n in needs.items())
      + "); lower per_device_batch_size, the resolution or num_frames, shard over more devices "
      "(ici_fsdp, ici_context), or train a LoRA", needs)


def _abstract_base(plan: Plan):
  """A LoRA run's frozen base as the state holds it (quantized kernels with qwix)."""
  base = transformer.abstract(plan.model, DTYPES[plan.options.weights_dtype])
  q = plan.options.quantization
  return base if q is None else jax.eval_shape(lambda p: quant.quantize(p, q), base)


def _tx(run: Run, expert: str):
  return run.tx[expert] if isinstance(run.tx, dict) else run.tx


def _of(run: Run, tree, expert: str):
  """One expert's part of a per-expert tree (the tree itself for a one-expert run)."""
  return tree[expert] if run.plan.expert == "both" else tree


def abstract_state(run: Run) -> dict:
  """ShapeDtypeStructs (with shardings) of the train state: what a checkpoint restores into."""
  plan, dtype = run.plan, DTYPES[run.plan.options.weights_dtype]
  params = params_lib.abstract(trained_declarations(plan), dtype)
  shapes = {"step": jax.ShapeDtypeStruct((), jnp.int32),
            "params": per_expert(plan, lambda _: params),
            "opt_state": per_expert(plan, lambda name: jax.eval_shape(_tx(run, name).init,
                                                                       params))}
  if plan.lora:
    shapes["base"] = per_expert(plan, lambda _: _abstract_base(plan))
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes,
                      run.state_shardings)


def _model_of(plan: Plan, trained, base):
  if plan.lora:  # a quantized base's kernels are QArrays: layers.dense quantizes for them
    return lora.attach(base, trained, plan.lora.scale)
  if plan.options.quantization is not None:  # quantization-aware training
    return quant.mark(trained, plan.options.quantization)
  return trained


def model_params(run: Run, state: dict):
  """The transformer tree the forward runs with: the params, or the base with the adapters
  ({expert: tree} for expert=both)."""
  return per_expert(run.plan, lambda name: _model_of(
      run.plan, _of(run, state["params"], name),
      _of(run, state["base"], name) if run.plan.lora else None))


def _init_optimizer(run: Run, params):
  return jax.jit(lambda p: per_expert(run.plan, lambda name: _tx(run, name).init(
      _of(run, p, name))), out_shardings=run.state_shardings["opt_state"])(params)


def _pretrained(run: Run, expert: str, merged=()):
  """One expert's pretrained (or, without weights, randomly initialised) transformer on the
  mesh, with the LoRA files `merged` merged in."""
  plan = run.plan
  return experts.pretrained(plan.model, plan.weights, DTYPES[plan.options.weights_dtype], expert,
                            experts.init_key(plan.seed, plan.expert, expert), merged, run.mesh)


def frozen_base(run: Run):
  """A LoRA run's frozen transformer(s): the pretrained one with every LoRA file but the first
  (which starts the adapter) merged, its selected kernels quantized with qwix_quantization."""
  plan = run.plan
  q = plan.options.quantization

  def one(name):
    base = _pretrained(run, name, experts.lora_loads(plan.lora_loads[1:], plan.expert, name))
    if q is None:
      return base
    return jax.jit(lambda p: quant.quantize(p, q),
                   out_shardings=_of(run, run.state_shardings["base"], name), donate_argnums=0)(base)
  return per_expert(plan, one)


def _start_adapter(run: Run, expert: str):
  plan = run.plan
  first = experts.lora_loads(plan.lora_loads[:1], plan.expert, expert)
  return lora.start(plan.model, plan.lora, experts.init_key(plan.seed, plan.expert, expert),
                    DTYPES[plan.options.weights_dtype],
                    first[0].read() if first else None,
                    first[0].scale if first else 1.0)


def init_state(run: Run) -> dict:
  """Step 0: pretrained (or randomly initialised) params and a fresh optimizer state; a LoRA
  run's adapters start from its first LoRA file or from lora.init."""
  plan = run.plan
  state = {}
  if plan.lora:
    state["base"] = frozen_base(run)
    p = jax.device_put(per_expert(plan, lambda name: _start_adapter(run, name)),
                       run.state_shardings["params"])
  else:
    p = per_expert(plan, lambda name: _pretrained(run, name))
  state["params"] = p
  state["opt_state"] = _init_optimizer(run, p)
  state["step"] = jax.device_put(jnp.zeros((), jnp.int32), run.state_shardings["step"])
  return state


def _scope(plan: Plan, name):
  return jax.named_scope(name) if plan.outputs.named_scopes else contextlib.nullcontext()


def draw(key, plan: Plan, shape, sigma_shape=None, sigma_range=None):
  """The step's randomness for latents (or packed tokens) of `shape`: (sigma, noise of `shape`,
  caption drop (bool, like sigma) or None, dropout key). sigma_shape: one noise level per
  entry, default (B,) (one per sample; packed batches: (B, K), one per clip). sigma_range:
  the noise levels drawn from (default the plan's; expert=both: the step's expert's side)."""
  sigma_key, noise_key, caption_key, dropout_key = jax.random.split(key, 4)
  sigma_shape = tuple(shape[:1] if sigma_shape is None else sigma_shape)
  f = plan.flow
  sigma = flow.sample_sigmas(sigma_key, math.prod(sigma_shape), sampling=f.sampling,
                             mean=f.logit_mean, std=f.logit_std, flow_shift=f.shift,
                             sigma_range=sigma_range or f.sigma_range).reshape(sigma_shape)
  noise = jax.random.normal(noise_key, shape, jnp.float32)
  drop = (jax.random.bernoulli(caption_key, f.caption_dropout, sigma_shape)
          if f.caption_dropout > 0 else None)
  return sigma, noise, drop, dropout_key


def flow_loss(p, batch: dict, sigma, noise, plan: Plan, *, drop=None, dropout_key=None):
  """Mean (weighted) squared velocity error of a batch at noise levels `sigma` (B,) and noise.

  drop: (B,) bool, samples whose caption becomes all padding (classifier-free guidance).
  """
  return sample_losses(p, batch, sigma, noise, plan, drop=drop, dropout_key=dropout_key).mean()


def sample_losses(p, batch: dict, sigma, noise, plan: Plan, *, drop=None, dropout_key=None,
                  weighted: bool = True):
  """`flow_loss` per sample: (B,) squared velocity errors, bell-weighted when the plan says so
  and `weighted` (evaluation compares unweighted losses)."""
  x0 = batch["latents"].astype(jnp.float32)
  x_t = flow.noisy(x0, noise, sigma)
  x_in, t, loss_frames = conditioning.model_inputs(
      plan.conditioning, x_t, flow.NUM_TRAIN_TIMESTEPS * sigma, plan.model.patch_size,
      conditioning.from_batch(plan.conditioning, batch))
  text, text_mask = batch["text"], batch["text_mask"]
  if drop is not None:  # an all-padding (zero) caption
    text = jnp.where(drop[:, None, None], 0.0, text)
    text_mask = text_mask | drop[:, None]
  opts = plan.options
  with _scope(plan, "forward"):
    pred = transformer.forward(p, plan.model, x_in.astype(opts.dtype), t, text.astype(opts.dtype),
                               batch.get("image"), text_mask=text_mask, options=opts,
                               dropout_rng=dropout_key if opts.dropout > 0 else None)
  with _scope(plan, "loss"):
    err = jnp.square(pred.astype(jnp.float32) - flow.velocity(x0, noise))
    if loss_frames is None:
      per_sample = err.mean(axis=(1, 2, 3, 4))
    else:
      per_sample = (err.mean(axis=(2, 3, 4)) * loss_frames).sum(1) / loss_frames.sum()
    if plan.flow.bell_weighting and weighted:
      per_sample = per_sample * flow.bell_weight(sigma, plan.flow.shift)
  return per_sample


def packed_flow_loss(p, batch: dict, sigma, noise, plan: Plan, *, drop=None, dropout_key=None):
  """`flow_loss` of a packed batch (wan/data/batch.py): the mean over its clips of each clip's
  (weighted) squared velocity error, every clip counting once whatever its size.

  sigma: (B, K) one noise level per clip (segment k + 1 of a row; padding entries unused);
  noise: (B, S, pv * C) per token; drop: (B, K) bool, clips whose caption becomes zeros.
  """
  ids, x0 = batch["segment_ids"], batch["tokens"].astype(jnp.float32)
  num_segments = sigma.shape[1]
  sigma_t = packing.segment_broadcast(sigma, ids)
  x_t = flow.noisy(x0.reshape(-1, x0.shape[-1]), noise.reshape(-1, x0.shape[-1]),
                   sigma_t.reshape(-1)).reshape(x0.shape)
  x_in, t, loss_tokens = packing.model_inputs(plan.conditioning, x_t,
                                              flow.NUM_TRAIN_TIMESTEPS * sigma_t, batch,
                                              plan.model.patch_volume)
  text = batch["text"]
  if drop is not None:
    # A dropped caption: its tokens become zeros (all alike, so as many zeros attend as one
    # would: the unpacked batch's all-padding caption).
    dropped = packing.segment_broadcast(drop, batch["text_segment_ids"])
    text = jnp.where(dropped[..., None], 0.0, text)
  opts = plan.options
  with _scope(plan, "forward"):
    pred = transformer.forward_packed(
        p, plan.model, x_in.astype(opts.dtype), batch["positions"], ids, t,
        text.astype(opts.dtype), batch["text_segment_ids"], batch.get("image"),
        batch.get("image_segment_ids"), options=opts,
        dropout_rng=dropout_key if opts.dropout > 0 else None)
  with _scope(plan, "loss"):
    err = jnp.square(pred.astype(jnp.float32) - flow.velocity(x0, noise)).mean(axis=-1)
    loss_ids = ids if loss_tokens is None else jnp.where(loss_tokens, ids, 0)
    per_segment = packing.segment_mean(err, loss_ids, num_segments)
    if plan.flow.bell_weighting:
      per_segment = per_segment * flow.bell_weight(sigma, plan.flow.shift)
    # Clips with a token in the loss (not padding; not a one-frame clip under first_frame).
    counted = (loss_ids[..., None] == jnp.arange(1, num_segments + 1)).any(axis=1)
    return jnp.sum(jnp.where(counted, per_segment, 0.0)) / jnp.maximum(counted.sum(), 1)


def loss_fn(p, batch: dict, key, plan: Plan, sigma_range=None):
  """The training loss of one global batch with the randomness of `key`: (loss, sigma).
  sigma_range: see `draw`."""
  if plan.data.pack:
    shape = batch["tokens"].shape
    sigma, noise, drop, dropout_key = draw(key, plan, shape,
                                           (shape[0], batch["segment_grid"].shape[1]),
                                           sigma_range)
    return packed_flow_loss(p, batch, sigma, noise, plan, drop=drop,
                            dropout_key=dropout_key), sigma
  sigma, noise, drop, dropout_key = draw(key, plan, batch["latents"].shape,
                                         sigma_range=sigma_range)
  return flow_loss(p, batch, sigma, noise, plan, drop=drop, dropout_key=dropout_key), sigma


def _micro(x, k: int):
  """(B, ...) -> (k, B / k, ...): micro-batch i holds samples i, k + i, 2k + i, ... (strided, so
  that each stays split over the data axis as the whole batch is)."""
  return x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1)


def _loss_and_grads(plan: Plan, model, trained, batch, key, sigma_range):
  """(loss, sigma, grads of the trained params) of one global batch; model(trained) is the
  transformer tree. With gradient accumulation the batch runs as plan.accumulation micro-batches
  in a lax.scan, with the whole batch's randomness, so the result is the whole batch's."""
  k = plan.accumulation
  if k == 1:
    (loss, sigma), grads = jax.value_and_grad(
        lambda p: loss_fn(model(p), batch, key, plan, sigma_range), has_aux=True)(trained)
    return loss, sigma, grads
  sigma, noise, drop, dropout_key = draw(key, plan, batch["latents"].shape,
                                         sigma_range=sigma_range)

  def body(acc, xs):
    b, s, n, d = xs
    loss, grads = jax.value_and_grad(lambda p: flow_loss(
        model(p), b, s, n, plan, drop=d, dropout_key=dropout_key))(trained)
    return jax.tree.map(jnp.add, acc, (loss, grads)), None

  zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, trained))
  xs = jax.tree.map(lambda x: _micro(x, k), (batch, sigma, noise, drop))
  (loss, grads), _ = jax.lax.scan(body, zeros, xs)
  return loss / k, sigma, jax.tree.map(lambda g: g / k, grads)


def _step_function(run: Run):
  """make_step(run); AUTO's compiled step for the batches of the shapes it was compiled for."""
  jitted = make_step(run)
  if run.compiled_step is None:
    return jitted
  shapes = {k: v.shape for k, v in batch_lib.abstract(run.plan, run.mesh).items()}

  def step(state, batch):
    same = {k: v.shape for k, v in batch.items()} == shapes
    return (run.compiled_step if same else jitted)(state, batch)
  return step


def _high_noise_step(key, plan: Plan):
  """expert=both: whether this step trains the high-noise expert, by one noise level drawn from
  the whole distribution (so each expert trains on its share of the steps)."""
  f = plan.flow
  sigma = flow.sample_sigmas(jax.random.fold_in(key, 1), 1, sampling=f.sampling,
                             mean=f.logit_mean, std=f.logit_std, flow_shift=f.shift)
  return sigma[0] >= plan.boundary


def make_step(run: Run):
  """The jitted train step: (state, batch) -> (state, metrics); the state is donated.

  A step whose loss or gradients are not finite keeps the old parameters and optimizer state
  (stats["finite"] says so; the loop counts them). Finite gradients (a finite global norm)
  bound AdamW's update by about the learning rate, so the new parameters are then finite too;
  checking them as well cost one more pass over every parameter. With
  gradient_accumulation_steps > 1 the batch runs as micro-batches (`_loss_and_grads`).
  expert=both: one expert per step (`_high_noise_step`), every sample of the batch at a noise
  level on its side of the boundary; a lax.cond runs that expert's forward, backward and
  optimizer update only, and the other expert's parameters and optimizer state are kept."""
  plan = run.plan

  def update(state, batch, key, expert, sigma_range=None):
    """One expert's (params, opt_state, loss, sigma, grad norm, finite) after its step; a step
    whose loss or gradients are not all finite keeps the old ones."""
    trained, opt_state = _of(run, state["params"], expert), _of(run, state["opt_state"], expert)
    base = _of(run, state["base"], expert) if plan.lora else None
    with _scope(plan, "grad"):
      loss, sigma, grads = _loss_and_grads(plan, lambda p: _model_of(plan, p, base), trained,
                                           batch, key, sigma_range)
    with _scope(plan, "optimizer"):
      updates, new_opt_state = _tx(run, expert).update(grads, opt_state, trained,
                                                       step=state["step"])
      new = optax.apply_updates(trained, updates)
    grad_norm = optim.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep = lambda a, b: jax.tree.map(lambda x, y: jnp.where(finite, x, y), a, b)
    return keep(new, trained), keep(new_opt_state, opt_state), loss, sigma, grad_norm, finite

  def step(state, batch):
    key = jax.random.fold_in(jax.random.key(plan.seed), state["step"])
    new = dict(state, step=state["step"] + 1)
    stats = {}
    if plan.expert == "both":
      high = _high_noise_step(key, plan)
      b = plan.boundary
      params, opt_state, loss, sigma, grad_norm, finite = jax.lax.cond(
          high, lambda: update(state, batch, key, "high_noise", (b, 1.0)),
          lambda: update(state, batch, key, "low_noise", (0.0, b)))
      pick = lambda new_tree, old_tree, trained: jax.tree.map(  # the other keeps its values
          lambda a, b: jnp.where(trained, a, b), new_tree, old_tree)
      new["params"] = {"high_noise": pick(params, state["params"]["high_noise"], high),
                       "low_noise": pick(params, state["params"]["low_noise"], ~high)}
      new["opt_state"] = {"high_noise": pick(opt_state, state["opt_state"]["high_noise"], high),
                          "low_noise": pick(opt_state, state["opt_state"]["low_noise"], ~high)}
      lr = jnp.where(high, optim.schedule(plan.optimizer)(state["step"]),
                     optim.schedule(plan.optimizer_low_noise)(state["step"]))
      stats["expert_high"] = high
    else:
      new["params"], new["opt_state"], loss, sigma, grad_norm, finite = update(
          state, batch, key, plan.expert)
      lr = optim.schedule(plan.optimizer)(state["step"])
    stats.update({"loss": loss, "grad_norm": grad_norm, "learning_rate": lr,
                  "sigma_mean": sigma.mean(), "finite": finite})
    if plan.data.pack:
      clips = batch["segment_grid"][..., 0] > 0
      stats["sigma_mean"] = jnp.sum(jnp.where(clips, sigma, 0.0)) / jnp.maximum(clips.sum(), 1)
      stats["segment_grid"] = batch["segment_grid"]  # the clips present, for the reporter
    return new, stats

  replicated = jax.NamedSharding(run.mesh, jax.P())
  return jax.jit(step, in_shardings=(run.state_shardings, batch_lib.shardings(plan, run.mesh)),
                 out_shardings=(run.state_shardings, replicated), donate_argnums=0,
                 compiler_options=numerics.compiler_options(run.mesh.devices.flat[0].platform))


def _make_output_dirs(out):
  """Creates the run's directories before any model is built: a path that cannot be written
  costs seconds, not a model load."""
  dirs = [("output_dir", out.run_dir)]
  if out.checkpoint_every > 0:
    dirs.append(("checkpoint_dir", out.checkpoint_dir))
  for field, path in dirs:
    try:
      fs.makedirs(path)
    except OSError as e:
      raise ConfigError(f"{field}: cannot create {path} ({e.strerror or e}); choose another "
                        f"{field}") from None


def save_lora(run: Run, state: dict, step: int) -> str:
  """Writes the adapters as {run_dir}/lora/<step>/ in the three LoRA formats (expert=both: one
  folder per expert in it; process 0 writes, every process takes part in gathering them);
  returns the directory. As with the checkpoints, the newest checkpoints_to_keep of these
  folders are kept and older ones removed (after the new one is complete)."""
  out = run.plan.outputs
  parent = fs.join(out.run_dir, "lora")
  directory = fs.join(parent, str(step))
  adapters = jax.tree.map(sharding.to_host, state["params"])
  if jax.process_index() == 0:
    if run.plan.expert == "both":  # <step>/high_noise/ and <step>/low_noise/
      for name in EXPERTS:
        lora.save(fs.join(directory, name), adapters[name], run.plan.lora.alpha)
    else:
      lora.save(directory, adapters, run.plan.lora.alpha)
    steps = sorted(int(name) for name in fs.listdir(parent) if name.isdigit())
    for old in steps[:-out.checkpoints_to_keep]:
      fs.rmtree(fs.join(parent, str(old)))
  return directory


def train(plan: Plan, devices=None) -> list[float]:
  """Runs (or resumes) training as planned; returns the losses of the steps it ran."""
  _make_output_dirs(plan.outputs)
  with guards.RunLock(plan.outputs.run_dir), guards.StopRequests() as stops:
    return _train(plan, devices, stops)


def _train(plan: Plan, devices, stops: guards.StopRequests) -> list[float]:
  run = setup(plan, devices)
  plan, out = run.plan, plan.outputs  # remat_policy=AUTO resolved
  it = data.make(plan, run.mesh)
  ckpt, found = None, None
  if out.checkpoint_every > 0:
    ckpt = checkpoint.Checkpointer(out.checkpoint_dir, out.checkpoints_to_keep,
                                   out.save_optimizer, out.single_replica_restore)
  if ckpt and ckpt.latest_step():  # restored straight into place: a full fine-tune's
    like = abstract_state(run)     # pretrained weights are not read
    if plan.lora:
      like["base"] = frozen_base(run)
    found = ckpt.restore_newest(like, log=metrics.log)
  first = found[0] if found else 0
  if found:
    _, state, data_state = found
    if not out.save_optimizer:
      state["opt_state"] = _init_optimizer(run, state["params"])
    it.restore(data_state)
    metrics.log(f"resumed from step {first}")
  else:
    state = init_state(run)
  step_fn = _step_function(run)
  writer = metrics.Writer(out.run_dir, plan.num_steps, out.write_metrics, out.flush_every,
                          first_step=first)
  report = metrics.Reporter(plan, run.mesh, writer)
  profiler = metrics.Profiler(out.profile_steps, out.run_dir, first)
  evaluator = (evaluate.Evaluator(plan, run.mesh, writer, sample_losses)
               if plan.evaluation else None)
  b = plan.global_batch
  try:
    pending = None
    with jax.set_mesh(run.mesh):
      for step in range(first, plan.num_steps):
        profiler.before_step(step)
        batch = next(it)
        state, stats = step_fn(state, batch)
        if ckpt:
          ckpt.poll()  # a save completed since: its file sizes (checkpoint.SIZES)
        if pending is not None:
          report(*pending)
        pending = (step, stats, batch["latents"].shape[1:] if "latents" in batch else None)
        done = step + 1
        evaluating = evaluator is not None and evaluator.due(done)
        stopping = stops.due(done)
        due = ckpt and (done * b // out.checkpoint_every > step * b // out.checkpoint_every
                        or done == plan.num_steps or stopping)
        if evaluating or due:  # the step's metrics row comes before its evaluation and checkpoint
          report(*pending)
          pending = None
        if evaluating:
          evaluator(done, model_params(run, state))
          report.restart_clock()  # the next step's time leaves the evaluation out
        if due:  # the metrics up to the checkpoint are on disk before it is
          writer.flush()
          ckpt.save(done, state, it.state())
        if plan.lora and (due or (ckpt is None and (done == plan.num_steps or stopping))):
          save_lora(run, state, done)
        if stopping:
          metrics.log(f"{stops.reason}: stopped after step {done}" + (
              f", saved in {out.checkpoint_dir}; rerun the same command to resume" if ckpt
              else " (checkpoint_every=-1: nothing to resume from)"))
          break
      if pending is not None:
        report(*pending)
  finally:  # also when a step stops the run: a checkpoint being written is completed
    profiler.stop()
    if hasattr(it, "close"):
      it.close()
    writer.close()
    if ckpt:
      ckpt.close()
  return report.losses
