"""In-training evaluation (plan.evaluation), every `every` steps: every process takes part (the
arrays are sharded like training's), process 0 writes. Evaluation reads its own data and keys,
so training (its batches, its randomness, its resume) is the same with it on or off.

Timestep eval (after the Scaling Rectified Flow Transformers paper): eval clips are paired with
the timesteps of timesteps_list round by round (round r gives clip i timestep (i + r) mod T),
each timestep taking at most max_per_bucket clips and all of them at most num_samples pairs; the
unweighted flow loss of each pair at sigma = t / 1000, with noise fixed per clip (from the seed
and the clip's index), so the numbers are comparable from one evaluation to the next:
    eval/loss_t<t>   the mean at timestep t        eval/loss   the mean over the timesteps
With 420 clips, 7 timesteps and 60 per bucket that is MaxDiffusion's one timestep per clip; a
small eval set gets every clip at every timestep.

Videos (enable_generate_video_for_eval): the prompts sampled with the current weights (prompt i
from the noise of seed + i), to samples/step_<N>/ as mp4 + contact sheet and to TensorBoard as
animated images eval/video_<i>.

SSIM (enable_ssim): the first eval clips of the first bucket (one global batch) are generated
from their own caption states and conditioning with the clip's fixed noise, and compared with
the VAE's reconstruction of the clip: eval/ssim, frame-averaged (wan/ssim.py).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from wan import fs, generate, numerics, pipeline, samplers, sharding, ssim, transformer
from wan.data import encode, loader, records
from wan.numerics import DTYPES

_NOISE_STREAM = 7  # eval noise keys: fold_in(key(seed), 7) then the clip index


def pairs(num_clips: int, timesteps, max_per_bucket: int, max_pairs: int) -> list[tuple[int, int]]:
  """(clip, timestep index) pairs of the timestep eval, in evaluation order (see above)."""
  count = [0] * len(timesteps)
  out = []
  for r in range(len(timesteps)):
    for i in range(num_clips):
      k = (i + r) % len(timesteps)
      if count[k] < max_per_bucket and len(out) < max_pairs:
        out.append((i, k))
        count[k] += 1
  return out


def clip_noise(seed: int, ids, shape):
  """(B, *shape) normal noise of the eval clips `ids` (B,): the same for a clip every time."""
  base = jax.random.fold_in(jax.random.key(seed), _NOISE_STREAM)
  return jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(base, i), shape))(ids)


def _place(mesh, host: dict) -> dict:
  """Global arrays of a host batch that every process holds whole, split over the batch axes."""
  out = {}
  for k, v in host.items():
    spec = sharding.spec(("batch",) + (None,) * (v.ndim - 1), v.shape, mesh)
    s = jax.NamedSharding(mesh, spec)
    out[k] = jax.make_array_from_callback(v.shape, s, lambda idx, v=v: v[idx])
  return out


class Evaluator:
  """Runs the plan's evaluation; `due(step)` says when, `__call__(step, params)` does it.

  sample_losses: wan.train.sample_losses (the training loss per sample, passed in so that the
  evaluation computes exactly what training does).
  """

  def __init__(self, plan, mesh, writer, sample_losses):
    self._plan, self._mesh, self._writer = plan, mesh, writer
    self._sample_losses = sample_losses
    self._eval = e = plan.evaluation
    self._clips = []
    if e.cache:
      reader = records.Reader(e.cache, e.manifest)
      refs = [(s["file"], r) for s in e.manifest["shards"] for r in s["records"]]
      limit = e.num_samples if e.timesteps else plan.global_batch
      self._clips = [reader.read(*ref) for ref in refs[:limit]]
    self._pipe = None
    if e.videos or e.ssim:
      self._pipe, self._prompts, self._negative = self._make_pipe()
    self._losses = jax.jit(self._batch_losses, compiler_options=numerics.compiler_options(
        mesh.devices.flat[0].platform))

  def due(self, step: int) -> bool:
    return step % self._eval.every == 0

  # -------------------------------------------------------------------------------- timesteps

  def _batch_losses(self, params, batch, sigma, ids):
    plan = self._plan
    noise = clip_noise(plan.seed, ids, batch["latents"].shape[1:])
    if plan.expert != "both":
      return self._sample_losses(params, batch, sigma, noise, plan, weighted=False)
    # expert=both: each sample's loss from the expert of its noise level.
    high, low = (self._sample_losses(params[name], batch, sigma, noise, plan, weighted=False)
                 for name in ("high_noise", "low_noise"))
    return jnp.where(sigma >= plan.boundary, high, low)

  def timestep_losses(self, params) -> dict:
    """{eval/loss_t<t>: mean, ..., eval/loss: mean of those} over the planned pairs."""
    plan, e = self._plan, self._eval
    by_shape = {}
    for i, k in pairs(len(self._clips), e.timesteps, e.max_per_bucket, e.num_samples):
      by_shape.setdefault(self._clips[i]["latents"].shape, []).append((i, k))
    sums, counts = np.zeros(len(e.timesteps)), np.zeros(len(e.timesteps))
    b = plan.global_batch
    for group in by_shape.values():
      for start in range(0, len(group), b):
        rows = group[start:start + b]
        real = len(rows)
        rows = rows + [rows[0]] * (b - real)  # a full batch; the repeats are not counted
        host = loader.assemble([self._clips[i] for i, _ in rows], plan)
        sigma = np.array([e.timesteps[k] / 1000.0 for _, k in rows], np.float32)
        ids = np.array([i for i, _ in rows], np.int32)
        with jax.set_mesh(self._mesh):
          losses = sharding.to_host(self._losses(params, _place(self._mesh, host), sigma, ids))
        for (_, k), loss in zip(rows[:real], losses[:real]):
          sums[k] += loss
          counts[k] += 1
    means = {t: sums[k] / counts[k] for k, t in enumerate(e.timesteps) if counts[k]}
    out = {f"eval/loss_t{t}": m for t, m in means.items()}
    if means:
      out["eval/loss"] = float(np.mean(list(means.values())))
    return out

  # -------------------------------------------------------------------------------- sampling

  def _make_pipe(self):
    """(pipe, prompt states, negative-prompt state) for sampling with the run's weights (given
    at each call). The prompts are encoded here once, and the text encoder is then let go: it
    takes no device memory while training. Wan 2.2 A14B takes its other expert from the root,
    or the trained one for both without a root."""
    plan, s = self._plan, self._eval.sampling
    encoders = encode.parts(plan.encoding, "float32", plan.options.weights_dtype)
    experts = {}
    other = {"high_noise": "low_noise", "low_noise": "high_noise", "both": None}[plan.expert]
    if plan.family.experts and plan.weights and other:
      experts[other] = transformer.load(plan.weights, DTYPES[plan.options.weights_dtype],
                                        expert=other)[1]
    pipe = pipeline.assemble(plan.family, plan.model, experts, plan.boundary, encoders,
                             plan.options, self._mesh)
    length = s.max_sequence_length
    prompts = pipeline.encode_prompts(pipe, s.prompts, length) if s.prompts else None
    negative = (pipeline.encode_prompts(pipe, [s.negative_prompt], length)
                if s.guidance_scale > 1 else None)
    return dataclasses.replace(pipe, text_params=None), prompts, negative

  def _with(self, params) -> pipeline.Pipe:
    if self._plan.expert == "both":  # params: {expert: tree}
      return dataclasses.replace(self._pipe, experts=dict(params))
    experts = dict(self._pipe.experts, **{self._plan.expert: params})
    if self._plan.family.experts and len(experts) == 1:
      experts = {"high_noise": params, "low_noise": params}
    return dataclasses.replace(self._pipe, experts=experts)

  def videos(self, step: int, params) -> dict:
    """The prompts' videos with the current weights (written by process 0)."""
    s = self._eval.sampling
    image = generate.read_image(s.image) if s.image else None
    pipe = self._with(params)
    out = {}
    for i in range(len(s.prompts)):  # as job=generate samples prompt i
      out[i] = pipeline.sample(
          pipe, self._prompts[i:i + 1], self._negative, height=s.height, width=s.width,
          num_frames=s.num_frames, num_inference_steps=s.num_inference_steps,
          guidance_scale=s.guidance_scale, guidance_scale_2=s.guidance_scale_2,
          flow_shift=s.flow_shift, sampler=s.sampler, seed=s.seed + i, image=image,
          progress=False)[0]
    if jax.process_index() == 0:
      out_dir = fs.join(self._plan.outputs.run_dir, "samples", f"step_{step}")
      fs.makedirs(out_dir)
      for i, video in out.items():
        generate.write_sample(out_dir, i, s.prompts[i], video, s.fps)
    self._writer.write_videos(step, {f"eval/video_{i}": v for i, v in out.items()}, s.fps)
    return out

  def ssim_score(self, params) -> dict:
    """eval/ssim: videos generated from a batch of eval clips' captions vs the clips."""
    plan, s = self._plan, self._eval.sampling
    first = self._clips[0]["latents"].shape
    clips = [c for c in self._clips if c["latents"].shape == first][:plan.global_batch]
    host = loader.assemble(clips, plan)
    pipe = self._with(params)
    n = len(clips)
    ids = jnp.arange(n)
    noise = clip_noise(plan.seed, ids, first)
    kind, cond = plan.conditioning, {}
    if kind == "concat":
      cond = {"cond": jnp.asarray(host["cond"]), "cond_mask": jnp.asarray(host["cond_mask"])}
    elif kind == "first_frame":
      cond = {"first_frame": jnp.asarray(host["latents"][:, :1])}
    image = jnp.asarray(host["image"]) if "image" in host else None
    negative = None if self._negative is None else jnp.repeat(self._negative, n, axis=0)
    schedule = samplers.schedule(s.sampler, s.num_inference_steps, s.flow_shift)
    latents = pipeline.denoise(pipe, noise, jnp.asarray(host["text"]), negative, schedule,
                               kind=kind, cond=cond, image_states=image,
                               guidance_scale=s.guidance_scale,
                               guidance_scale_2=s.guidance_scale_2, progress=False)
    made = pipeline.decode(pipe, latents)
    reference = pipeline.decode(pipe, jnp.asarray(host["latents"]))
    return {"eval/ssim": float(np.mean(sharding.to_host(ssim.ssim(made, reference))))}

  def __call__(self, step: int, params):
    metrics = {}
    if self._eval.timesteps:
      metrics.update(self.timestep_losses(params))
    if self._eval.ssim:
      metrics.update(self.ssim_score(params))
    if self._eval.videos:
      self.videos(step, params)
    if metrics:
      self._writer.write_eval(step, metrics)
    return metrics
