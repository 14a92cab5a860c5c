"""Generation: prompts (and an image) to videos with a Wan model, as diffusers' Wan pipelines
make them (WanPipeline, WanImageToVideoPipeline), sharded over a device mesh.

    pipe = wan.pipeline.load("Wan2.1-T2V-1.3B-Diffusers")
    video = wan.pipeline.generate(pipe, "a cat", height=480, width=832, num_frames=81)

Data flow of `generate`:
  prompts -> cleaned -> tokenizer -> UMT5 (states past each prompt zero)      text (B, L, D)
  image -> CLIP penultimate states (Wan 2.1 I2V)                              image (B, T, D')
  image -> VAE -> condition latents (+ first-frame mask): the I2V kinds       cond
  noise latents -> per step: conditioning.model_inputs -> transformer on [cond; uncond] in one
    batch -> guidance -> sampler step (wan/samplers.py)  -> VAE decode (tiled) -> [0, 1]
Wan 2.2 A14B runs the high-noise expert while the step's timestep >= boundary_ratio x 1000 and
the low-noise one (with guidance_scale_2) after.

A `Pipe` holds placed parameters and the settings read from the root; training builds one over
its own parameters for in-training samples (wan/evaluate.py).
"""

import dataclasses
import functools
import html
import re
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from wan import (checkpoint, conditioning, families, flow, fs, image_encoder, lora, metrics,
                 params as params_lib, samplers, sharding, text_encoder, transformer, vae, video_tokens)
from wan.errors import ConfigError
from wan.numerics import DTYPES
from wan.weights import roots


@dataclasses.dataclass(frozen=True)
class Pipe:
  """A model ready to sample: its parts placed on `mesh`.

  experts: {"high_noise": params} for one-expert models; Wan 2.2 A14B adds "low_noise"
  (transformer_2/), taken below `boundary` (a sigma, boundary_ratio).
  """
  family: families.Family
  model: transformer.Config
  experts: dict
  boundary: float | None
  options: transformer.Options
  vae_cfg: vae.Config
  vae_params: dict
  text_cfg: text_encoder.Config
  text_params: dict
  tokenize: object  # wan.tokenizer.Tokenizer
  image_cfg: image_encoder.Config | None
  image_params: dict | None
  scheduler: dict  # the root's scheduler_config.json ({} when there is none)
  mesh: jax.sharding.Mesh

  @property
  def image_to_video(self) -> bool:
    """Whether the model needs an image (Wan 2.1 I2V, Wan 2.2 I2V A14B)."""
    return "T2V" not in self.family.model_types


def default_mesh(devices=None) -> jax.sharding.Mesh:
  """All devices on the fsdp axis: parameters split over them, the batch too where it divides."""
  ones = {a: 1 for a in sharding.MESH_AXES}
  return sharding.make_mesh(dict(ones, fsdp=-1), ones, devices)


def default_options(dtype=jnp.float32) -> transformer.Options:
  name = jnp.dtype(dtype).name
  attention = "dot_product" if jax.devices()[0].platform == "cpu" else "flash"
  return transformer.Options(weights_dtype=name, activations_dtype=name, attention=attention,
                             scan_layers=True)


def family_of(model: transformer.Config, vae_cfg: vae.Config, index: dict | None) -> families.Family:
  """The family of a root's transformer, VAE and model_index.json (checked to fit)."""
  index = index or {}
  latent = "wan2.2" if vae_cfg.is_residual else "wan2.1"
  if latent == "wan2.2":
    name = "wan2.2-ti2v-5b"
  elif index.get("boundary_ratio") is not None:
    name = "wan2.2-i2v-a14b" if model.in_channels != model.out_channels else "wan2.2-t2v-a14b"
  else:
    name = "wan2.1-i2v" if model.in_channels != model.out_channels else "wan2.1-t2v"
  family = families.FAMILIES[name]
  problems = families.architecture_problems(family, model, vae_cfg.z_dim)
  if problems:
    raise ConfigError(f"the root's transformer does not fit {name} ({'; '.join(problems)})")
  return family


def load(path, dtype=jnp.float32, *, mesh=None, options=None, checkpoint_dir=None,
         expert: str = "high_noise", vae_tiling: bool = True) -> Pipe:
  """A diffusers-format Wan model root, placed on `mesh` (default: all devices, fsdp).

  path: a root with model_index.json, transformer/ (+ transformer_2/ and boundary_ratio for
  Wan 2.2 A14B), vae/, text_encoder/ + tokenizer/, image_encoder/ + image_processor/ for Wan 2.1
  I2V, scheduler/. dtype: the transformer's and text encoder's weights and activations; the VAE
  and CLIP run in float32 (as Wan's own pipelines do). options: transformer.Options (default:
  dtype, XLA attention on CPU, the Pallas kernels elsewhere). checkpoint_dir: a training run's
  checkpoints (trained from this root): its newest parameters replace `expert`'s.
  vae_tiling: decode frames over 256 px in overlapping tiles, as diffusers' `vae.enable_tiling()`
  (bounded memory at 720p); False decodes whole frames, as diffusers does by default.
  """
  path = str(path)
  mesh = mesh or default_mesh()
  options = options or default_options(dtype)
  index = roots.model_index(path)
  vae_cfg, vae_params = vae.load(path, "float32")
  model, high = transformer.load(path, DTYPES[options.weights_dtype])
  family = family_of(model, vae_cfg, index)
  experts = {"high_noise": high}
  if family.experts:
    low_cfg, experts["low_noise"] = transformer.load(path, DTYPES[options.weights_dtype],
                                                     expert="low_noise")
    if low_cfg != model:
      raise ConfigError(f"{path}: transformer_2/ has another architecture than transformer/")
  name = jnp.dtype(dtype).name
  text_cfg, text_params, tokenize = text_encoder.load(path, weights_dtype=name,
                                                      activations_dtype=name)
  encoders = dict(vae_cfg=vae_cfg, vae_params=vae_params, text_cfg=text_cfg,
                  text_params=text_params, tokenize=tokenize, image_cfg=None, image_params=None)
  if family.image_tokens:
    encoders["image_cfg"], encoders["image_params"] = image_encoder.load(path)
  config = fs.join(path, "scheduler", "scheduler_config.json")
  boundary = None
  if family.experts:
    boundary = float((index or {}).get("boundary_ratio") or family.boundary)
  pipe = assemble(family, model, experts, boundary, encoders, options, mesh,
                  roots.read_json(config) if fs.exists(config) else {}, vae_tiling)
  return with_checkpoint(pipe, checkpoint_dir, expert)[0] if checkpoint_dir else pipe


def with_checkpoint(pipe: Pipe, directory: str, expert: str = "high_noise",
                    adapter: lora.Settings | None = None):
  """(pipe, step): the newest checkpoint of a training run (its checkpoints/ directory) in place
  of `expert`'s parameters (expert="both": of both Wan 2.2 A14B experts, as an expert=both run
  saves them), or, for a LoRA run (`adapter`: the rank, alpha and targets it trained), merged
  into them; (pipe, None) when the directory holds none."""
  names = ("high_noise", "low_noise") if expert == "both" else (expert,)
  for name in names:
    if name not in pipe.experts:
      raise ConfigError(f"expert={expert!r}: this model has {sorted(pipe.experts)}")
  if adapter is None:
    like_one = pipe.experts.__getitem__
  else:
    decls = lora.declarations(pipe.model, adapter)
    adapters = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            params_lib.abstract(decls, DTYPES[pipe.options.weights_dtype]),
                            params_lib.shardings(decls, pipe.mesh))
    like_one = lambda _: adapters
  like = {n: like_one(n) for n in names} if expert == "both" else like_one(expert)
  found = checkpoint.latest_params(fs.absolute(directory), like)
  if found is None:
    return pipe, None
  step, restored = found
  restored = restored if expert == "both" else {expert: restored}
  if adapter is not None:
    restored = {n: jax.device_put(lora.merge(pipe.experts[n], restored[n], adapter.scale),
                                  transformer.shardings(pipe.model, pipe.mesh))
                for n in names}
  return dataclasses.replace(pipe, experts={**pipe.experts, **restored}), step


def assemble(family, model, experts: dict, boundary, encoders: dict, options, mesh,
             scheduler: dict | None = None, vae_tiling: bool = True) -> Pipe:
  """A Pipe from its parts, placed on `mesh`: experts {"high_noise": params[, "low_noise":
  params]}; encoders: wan.data.encode.parts' dict (vae_cfg, vae_params, text_cfg, text_params,
  tokenize, image_cfg, image_params); scheduler: a root's scheduler_config.json, if any."""
  encoders = dict(encoders,
                  vae_cfg=dataclasses.replace(encoders["vae_cfg"], use_tiling=vae_tiling))
  return place(Pipe(family=family, model=model, experts=experts, boundary=boundary,
                    options=options, scheduler=scheduler or {}, mesh=mesh, **encoders))


def place(pipe: Pipe) -> Pipe:
  """The pipe with its parameters on its mesh: transformers by the rule table (fsdp / tensor),
  the encoders and the VAE replicated."""
  mesh = pipe.mesh
  replicated = jax.NamedSharding(mesh, jax.P())
  experts = {k: jax.device_put(v, transformer.shardings(pipe.model, mesh))
             for k, v in pipe.experts.items()}
  others = {name: None if getattr(pipe, name) is None else
            jax.device_put(getattr(pipe, name), replicated)
            for name in ("vae_params", "text_params", "image_params")}
  return dataclasses.replace(pipe, experts=experts, **others)


# ----------------------------------------------------------------------------------------------
# Inputs.


def clean_prompt(text: str) -> str:
  """diffusers' prompt cleaning: HTML entities unescaped (twice), whitespace runs to one space.
  (diffusers also runs ftfy's mojibake repair when ftfy is installed; well-formed text is
  unchanged by it.)"""
  return re.sub(r"\s+", " ", html.unescape(html.unescape(text)).strip()).strip()


def _batch_sharded(pipe: Pipe, x):
  return vae.shard_batch(x, pipe.mesh)  # split over data x fsdp where the batch divides


def encode_prompts(pipe: Pipe, prompts, max_sequence_length: int):
  """UMT5 states (B, max_sequence_length, D) of the cleaned prompts, zero past each prompt."""
  ids, mask = pipe.tokenize([clean_prompt(p) for p in prompts], max_sequence_length)
  with jax.set_mesh(pipe.mesh):
    return _encode_text(pipe.text_params, pipe.text_cfg, _batch_sharded(pipe, ids),
                        _batch_sharded(pipe, mask))


_encode_text = jax.jit(text_encoder.encode, static_argnames="cfg")
_encode_image = jax.jit(image_encoder.encode, static_argnames="cfg")


def _encode_video(params, cfg, video):
  return vae.normalize(cfg, vae.encode(params, cfg, video))


def _image_array(image, height: int, width: int, batch: int) -> np.ndarray:
  """(B, height, width, 3) float32 in [0, 1] from an (H, W, 3) or (B, H, W, 3) uint8 / float
  image; other sizes are scaled to cover and centre-cropped (as training clips are)."""
  x = np.asarray(image)
  if x.ndim == 3:
    x = x[None]
  if x.ndim != 4 or x.shape[-1] != 3:
    raise ValueError(f"image must be (H, W, 3) or (B, H, W, 3) RGB; got shape {x.shape}")
  if x.shape[0] not in (1, batch):
    raise ValueError(f"{x.shape[0]} images for {batch} prompts; pass one image or one per prompt")
  x = x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x.astype(np.float32)
  if x.shape[1:3] != (height, width):
    from wan.data import buckets  # pylint: disable=import-outside-toplevel
    x = np.stack([buckets.resize_crop((im * 255).round().astype(np.uint8)[None],
                                      (height, width))[0] for im in x]).astype(np.float32) / 255
  return np.broadcast_to(x, (batch,) + x.shape[1:])


def condition(pipe: Pipe, image, latent_shape, num_frames: int) -> tuple[str, dict, object]:
  """(conditioning kind, its inputs for conditioning.model_inputs, CLIP states or None).

  image: (B, H, W, 3) float32 in [0, 1] or None; latent_shape: (B, F', H', W', C).
  """
  if image is None:
    return "none", {}, None
  kind = pipe.family.i2v
  pixels = jnp.asarray(image * 2.0 - 1.0)[:, None]  # (B, 1, H, W, 3) in [-1, 1]
  with jax.set_mesh(pipe.mesh):
    states = None
    if pipe.image_params is not None:
      states = _encode_image(pipe.image_params, pipe.image_cfg, _batch_sharded(pipe, image))
    if kind == "first_frame":  # TI2V: the image alone is the clean first latent frame
      return kind, {"first_frame": _encode_video(pipe.vae_params, pipe.vae_cfg, pixels)}, states
    # concat: the image then grey frames through the VAE, and a mask on the first latent frame
    b, f, h, w, _ = latent_shape
    video = jnp.concatenate([pixels, jnp.zeros((b, num_frames - 1) + pixels.shape[2:])], axis=1)
    cond = _encode_video(pipe.vae_params, pipe.vae_cfg, video)
    mask = jnp.zeros((b, f, h, w, conditioning.MASK_CHANNELS), jnp.float32).at[:, 0].set(1.0)
    return kind, {"cond": cond, "cond_mask": mask}, states


# ----------------------------------------------------------------------------------------------
# Sampling.


@functools.partial(jax.jit, static_argnames=("model", "options", "kind", "guided"))
def velocity(params, x, t, text, image, cond, scale, *, model, options, kind, guided):
  """The (guided) velocity at latents x (B, F, H, W, C), timestep t (scalar): with guidance the
  conditional and unconditional halves run as one batch (text: (2B, L, D), conditional first)."""
  b = x.shape[0]
  x_in, timestep, _ = conditioning.model_inputs(kind, x, jnp.full((b,), t, jnp.float32),
                                                model.patch_size, cond)
  if guided:
    x_in, timestep = (jnp.concatenate([a, a]) for a in (x_in, timestep))
    image = None if image is None else jnp.concatenate([image, image])
  v = transformer.forward(params, model, x_in.astype(options.dtype), timestep,
                          text.astype(options.dtype),
                          None if image is None else image.astype(options.dtype),
                          options=options).astype(jnp.float32)
  if guided:
    v_cond, v_uncond = v[:b], v[b:]
    v = v_uncond + scale * (v_cond - v_uncond)
  return v



def _progress(i: int, total: int, start: float):
  if jax.process_index() != 0:
    return
  done = i + 1
  rate = (time.perf_counter() - start) / done
  end = "\n" if done == total else ""
  print(f"\rsampling {metrics.bar(done, total)} {done}/{total} {rate:.2f} s/step", end=end,
        file=sys.stderr, flush=True)


def denoise(pipe: Pipe, latents, text, negative, schedule: samplers.Schedule, *, kind="none",
            cond=None, image_states=None, guidance_scale=5.0, guidance_scale_2=None,
            progress=True):
  """Runs the sampler from noise `latents` (B, F', H', W', C) to clean latents (normalised).

  text, negative: (B, L, D) prompt and negative-prompt states (negative unused without
  guidance, i.e. guidance_scale <= 1, as diffusers decides). kind / cond: `condition`'s.
  """
  guided = guidance_scale > 1.0
  both = jnp.concatenate([text, negative]) if guided else text
  if guidance_scale_2 is None:
    guidance_scale_2 = guidance_scale
  boundary_t = None if pipe.boundary is None else pipe.boundary * flow.NUM_TRAIN_TIMESTEPS
  state = samplers.init(schedule, latents)
  cond = cond or {}
  start = time.perf_counter()
  with jax.set_mesh(pipe.mesh):
    x = _batch_sharded(pipe, jnp.asarray(latents, jnp.float32))
    both = _batch_sharded(pipe, both)
    steps = len(schedule.timesteps)
    for i in range(steps):
      t = float(schedule.timesteps[i])
      high = boundary_t is None or t >= boundary_t
      params = pipe.experts["high_noise" if high else "low_noise"]
      scale = guidance_scale if high else guidance_scale_2
      v = velocity(params, x, jnp.float32(t), both, image_states, cond, jnp.float32(scale),
                   model=pipe.model, options=pipe.options, kind=kind, guided=guided)
      x, state = samplers.step(schedule, state, i, v, x)
      if progress:
        _progress(i, steps, start)
    if kind == "first_frame":
      x = x.at[:, :1].set(cond["first_frame"])
  return x


def decode(pipe: Pipe, latents) -> np.ndarray:
  """Normalised latents (B, F', H', W', C) -> video (B, F, H, W, 3) float32 in [0, 1] (the VAE
  tiles frames larger than its tile size)."""
  with jax.set_mesh(pipe.mesh):
    video = vae.decode(pipe.vae_params, pipe.vae_cfg, vae.denormalize(pipe.vae_cfg, latents))
  return np.clip(sharding.to_host(video).astype(np.float32) / 2.0 + 0.5, 0.0, 1.0)


def check_size(pipe: Pipe, height: int, width: int, num_frames: int):
  """Sizes the VAE and the patches divide; raises ValueError saying what to use."""
  video_tokens.check_video_size(height, width, num_frames, pipe.vae_cfg.scale_factor_spatial,
                                pipe.vae_cfg.scale_factor_temporal, pipe.model.patch_size)


def generate(pipe: Pipe, prompts, *, negative_prompt="", height: int, width: int,
             num_frames: int, num_inference_steps: int = 50, guidance_scale: float = 5.0,
             guidance_scale_2=None, flow_shift=None, sampler: str = "unipc", seed: int = 0,
             latents=None, image=None, max_sequence_length: int = 512,
             progress: bool = True) -> np.ndarray:
  """Videos for `prompts` (a string or a list), as diffusers' Wan pipelines make them.

  latents: the initial noise, channels-last (B, F', H', W', C) (default: normal noise from
  `seed`). image: (H, W, 3) or (B, H, W, 3), uint8 or float in [0, 1]: needed by the I2V
  models, optional for TI2V 5B (then image-conditioned), refused by the T2V ones.
  flow_shift: None takes the root scheduler's. guidance_scale_2: the low-noise expert's
  (Wan 2.2 A14B; None: guidance_scale). Returns float32 (B, F, H, W, 3) in [0, 1].
  """
  prompts = [prompts] if isinstance(prompts, str) else list(prompts)
  negatives = ([negative_prompt] * len(prompts) if isinstance(negative_prompt, str)
               else list(negative_prompt))
  if not prompts or len(negatives) != len(prompts):
    raise ValueError(f"{len(prompts)} prompts and {len(negatives)} negative prompts; pass at "
                     "least one prompt and one negative prompt (or one for all)")
  _latent_shape(pipe, len(prompts), height, width, num_frames, image, guidance_scale_2, latents)
  samplers.check(sampler, num_inference_steps, 1.0 if flow_shift is None else flow_shift)
  text = encode_prompts(pipe, prompts, max_sequence_length)
  negative = encode_prompts(pipe, negatives, max_sequence_length) if guidance_scale > 1 else None
  return sample(pipe, text, negative, height=height, width=width, num_frames=num_frames,
                num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                guidance_scale_2=guidance_scale_2, flow_shift=flow_shift, sampler=sampler,
                seed=seed, latents=latents, image=image, progress=progress)


def sample(pipe: Pipe, text, negative, *, height: int, width: int, num_frames: int,
           num_inference_steps: int = 50, guidance_scale: float = 5.0, guidance_scale_2=None,
           flow_shift=None, sampler: str = "unipc", seed: int = 0, latents=None, image=None,
           progress: bool = True) -> np.ndarray:
  """`generate` from prompt states (`encode_prompts`): text (B, L, D), negative (B, L, D), or
  None without guidance. Training's evaluation encodes its prompts once and samples with this."""
  shape = _latent_shape(pipe, text.shape[0], height, width, num_frames, image, guidance_scale_2,
                        latents)
  if latents is None:
    latents = jax.random.normal(jax.random.key(seed), shape, jnp.float32)
  shift, train_steps = flow_shift, flow.NUM_TRAIN_TIMESTEPS
  if shift is None:
    if not pipe.scheduler:
      raise ValueError("the model root has no scheduler/scheduler_config.json: pass flow_shift=")
    settings = samplers.from_scheduler_config(pipe.scheduler)
    shift, train_steps = settings["shift"], settings["num_train_timesteps"]
  schedule = samplers.schedule(sampler, num_inference_steps, shift, train_steps)
  pixels = None if image is None else _image_array(image, height, width, shape[0])
  kind, cond, states = condition(pipe, pixels, shape, num_frames)
  out = denoise(pipe, latents, text, negative, schedule, kind=kind, cond=cond,
                image_states=states, guidance_scale=guidance_scale,
                guidance_scale_2=guidance_scale_2, progress=progress)
  return decode(pipe, out)


def _latent_shape(pipe: Pipe, batch: int, height, width, num_frames, image, guidance_scale_2,
                  latents) -> tuple:
  """The noise shape (B, F', H', W', C) of a request, checked (ValueError saying what to use)."""
  check_size(pipe, height, width, num_frames)
  if pipe.image_to_video and image is None:
    raise ValueError(f"{pipe.family.name} is an image-to-video model: pass image=")
  if image is not None and pipe.family.i2v == "none":
    raise ValueError(f"{pipe.family.name} is a text-to-video model; it takes no image")
  if guidance_scale_2 is not None and pipe.boundary is None:
    raise ValueError("guidance_scale_2 applies to the two-expert Wan 2.2 A14B models only")
  s, t = pipe.vae_cfg.scale_factor_spatial, pipe.vae_cfg.scale_factor_temporal
  shape = (batch, (num_frames - 1) // t + 1, height // s, width // s, pipe.vae_cfg.z_dim)
  if latents is not None and tuple(np.shape(latents)) != shape:
    raise ValueError(f"latents have shape {tuple(np.shape(latents))}; {batch} videos of "
                     f"{num_frames}x{height}x{width} take {shape} (channels-last)")
  return shape
