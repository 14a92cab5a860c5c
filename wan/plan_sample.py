"""The sampling half of the plan: reads the config's generation and evaluation fields (wan/plan.py
calls it; nothing else reads them).

  job=generate                 prompts -> videos under {output_dir}/{run_name}/samples/
  training, eval_every > 0     timestep eval (loss at fixed timesteps over eval clips), sample
                               videos, SSIM of videos generated from the eval clips' captions
"""

import dataclasses

from wan import fs, plan_data, samplers, video_tokens
from wan.data import records
from wan.errors import ConfigError, MissingFile


@dataclasses.dataclass(frozen=True)
class Sampling:
  """How videos are sampled (the generate job's and the eval videos')."""
  prompts: tuple[str, ...]
  negative_prompt: str
  height: int
  width: int
  num_frames: int
  num_inference_steps: int
  guidance_scale: float
  guidance_scale_2: float | None  # Wan 2.2 A14B low-noise expert; None: guidance_scale
  flow_shift: float
  sampler: str
  seed: int
  fps: float
  max_sequence_length: int
  image: str  # the conditioning image (I2V; optional for TI2V), "" for none


@dataclasses.dataclass(frozen=True)
class Evaluation:
  """In-training evaluation, every `every` steps."""
  every: int
  timesteps: tuple[int, ...]  # timestep eval at these (0..1000); () = off
  num_samples: int
  max_per_bucket: int
  cache: str  # eval_data_dir: a cache that job=prepare wrote ("" without timestep eval / SSIM)
  manifest: dict | None = dataclasses.field(default=None, compare=False, hash=False)
  videos: bool = False  # enable_generate_video_for_eval
  ssim: bool = False
  sampling: Sampling | None = None  # videos and SSIM


def _fail(message):
  raise ConfigError(message)


def _prompts(c, required: bool) -> tuple[str, ...]:
  """prompt, or the lines of prompts_file (blank lines skipped)."""
  if c.prompt and c.prompts_file:
    _fail("set prompt or prompts_file, not both")
  if c.prompts_file:
    path = fs.absolute(c.prompts_file)
    if not fs.exists(path):
      raise MissingFile(f"prompts_file: {path} does not exist")
    with fs.open_file(path, "r") as f:
      prompts = tuple(line.strip() for line in f.read().splitlines() if line.strip())
    if not prompts:
      _fail(f"prompts_file: {path} holds no prompts (one per line)")
    return prompts
  if c.prompt:
    return (c.prompt,)
  if required:
    _fail("set prompt (--config.prompt=\"...\") or prompts_file (one prompt per line)")
  return ()


def sampling(c, family, model, vae_cfg, *, prompts_required: bool) -> Sampling:
  """The sampling settings of `c` for a model of `family` (checked: sizes, sampler, guidance,
  the image)."""
  if c.sampler not in samplers.SAMPLERS:
    _fail(f"sampler={c.sampler!r} is not one of {list(samplers.SAMPLERS)}")
  for field, ok, what in (("num_inference_steps", c.num_inference_steps >= 1, ">= 1"),
                          ("guidance_scale", c.guidance_scale >= 0, ">= 0 (<= 1: no guidance)"),
                          ("guidance_scale_2", c.guidance_scale_2 >= 0,
                           ">= 0 (0: guidance_scale)"),
                          ("fps", c.fps >= 0, "> 0, or 0 for the model's own frame rate")):
    if not ok:
      _fail(f"{field}={c[field]!r} must be {what}")
  if c.guidance_scale_2 and not family.experts:
    _fail(f"guidance_scale_2 applies to the two-expert Wan 2.2 A14B models; {family.name} has "
          "one: leave it at 0")
  image = fs.absolute(c.image)
  if image:
    if family.i2v == "none" or c.model_type == "T2V" and family.i2v != "first_frame":
      _fail(f"image: {family.name} with model_type={c.model_type} takes no image")
    if not fs.exists(image):
      raise MissingFile(f"image: {image} does not exist")
  try:
    video_tokens.check_video_size(c.height, c.width, c.num_frames, vae_cfg.scale_factor_spatial,
                                  vae_cfg.scale_factor_temporal, model.patch_size)
  except ValueError as e:
    _fail(str(e))
  return Sampling(
      prompts=_prompts(c, prompts_required), negative_prompt=c.negative_prompt,
      height=int(c.height), width=int(c.width), num_frames=int(c.num_frames),
      num_inference_steps=int(c.num_inference_steps), guidance_scale=float(c.guidance_scale),
      guidance_scale_2=float(c.guidance_scale_2) or None, flow_shift=float(c.flow_shift),
      sampler=c.sampler, seed=int(c.seed), fps=float(c.fps) or family.fps,
      max_sequence_length=int(c.max_sequence_length), image=image)


def needs_image(family, model_type: str) -> bool:
  return model_type == "I2V" and family.i2v == "concat"


def evaluation(c, family, model, vae_cfg, sigma_range=(0.0, 1.0)) -> Evaluation | None:
  """The in-training evaluation of `c` (None when eval_every <= 0); sigma_range: the noise
  levels the run trains (a Wan 2.2 A14B expert's side of the boundary)."""
  on = c.timestep_eval or c.enable_generate_video_for_eval or c.enable_ssim
  if not on:
    return None
  if c.eval_every < 1:
    _fail("timestep_eval, enable_generate_video_for_eval and enable_ssim run every eval_every "
          "steps: set eval_every >= 1")
  timesteps = ()
  if c.timestep_eval:
    timesteps = tuple(int(t) for t in c.timesteps_list)
    if not timesteps or any(not 0 <= t <= 1000 for t in timesteps):
      _fail(f"timesteps_list={c.timesteps_list} must be timesteps in [0, 1000]")
    low, high = (1000 * x for x in sigma_range)
    outside = [t for t in timesteps if not low <= t <= high]
    if outside:
      _fail(f"timesteps_list has {outside}, outside the {low:g}..{high:g} that expert="
            f"{c.expert} trains; evaluate it at timesteps in that range")
    for field in ("num_eval_samples", "eval_max_number_of_samples_in_bucket"):
      if c[field] < 1:
        _fail(f"{field}={c[field]} must be >= 1")
  manifest, cache = None, ""
  if c.timestep_eval or c.enable_ssim:
    if not c.eval_data_dir:
      _fail("timestep_eval and enable_ssim read eval clips: set eval_data_dir to a cache that "
            "job=prepare wrote (with --config.eval_data_dir=<clips> it writes one to "
            "{tfrecords_dir}/eval)")
    cache = fs.absolute(c.eval_data_dir)
    manifest = records.read_manifest(cache)
    plan_data.check_cache(c, manifest, cache, family, model)
  if c.enable_generate_video_for_eval and needs_image(family, c.model_type) and not c.image:
    _fail(f"enable_generate_video_for_eval with {family.name} samples image-to-video: set "
          "image to the conditioning image")
  sample = None
  if c.enable_generate_video_for_eval or c.enable_ssim:
    sample = sampling(c, family, model, vae_cfg,
                      prompts_required=bool(c.enable_generate_video_for_eval))
  return Evaluation(every=int(c.eval_every), timesteps=timesteps,
                    num_samples=int(c.num_eval_samples),
                    max_per_bucket=int(c.eval_max_number_of_samples_in_bucket), cache=cache,
                    manifest=manifest, videos=bool(c.enable_generate_video_for_eval),
                    ssim=bool(c.enable_ssim), sampling=sample)
