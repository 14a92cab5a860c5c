"""job=generate: videos for the config's prompts, written under {output_dir}/{run_name}/samples/.

The model is the config's: a diffusers root (pretrained_model_name_or_path), with the newest
checkpoint of the run (checkpoint_dir, default {output_dir}/{run_name}/checkpoints) in place of
its transformer when there is one (merged into it for a LoRA run, enable_lora=True); the tiny
configs use random weights (from `seed`) and the built-in tiny encoders. With enable_lora, the
LoRA files of lora_config are merged first, each at its scale. Prompt i is sampled from the
noise of seed + i.

    samples/<tag>/<i>_<prompt words>.mp4   the video at `fps`
    samples/<tag>/<i>_<prompt words>.png   a contact sheet of its frames
<tag> is step_<N> for a training checkpoint's weights, base for the root's (or random) ones.
"""

import re

import jax
import numpy as np

from wan import experts, fs, media, pipeline, sharding
from wan.data import encode
from wan.errors import BadSample
from wan.numerics import DTYPES
from wan.plan import Generation


def sample_name(index: int, prompt: str) -> str:
  """A file stem for a prompt: its index and first words (letters and digits only)."""
  words = re.sub(r"[^0-9A-Za-z]+", "_", prompt).strip("_")[:40].rstrip("_")
  return f"{index:03d}_{words or 'prompt'}"


def write_sample(out_dir: str, index: int, prompt: str, video, fps: float) -> str:
  """Writes a video (F, H, W, 3) in [0, 1] as <index>_<words>.mp4 and its contact sheet .png
  under out_dir; returns the mp4's path."""
  stem = fs.join(out_dir, sample_name(index, prompt))
  media.write_mp4(stem + ".mp4", video, fps)
  media.write_png(stem + ".png", media.contact_sheet(video))
  return stem + ".mp4"


def read_image(path: str) -> np.ndarray:
  """An image file as (H, W, 3) uint8 (alpha dropped, grey expanded)."""
  import imageio.v3 as iio  # pylint: disable=import-outside-toplevel
  try:
    with fs.open_file(path, "rb") as f:
      image = np.asarray(iio.imread(f.read()))
  except Exception as e:  # pylint: disable=broad-except
    raise BadSample(path, f"cannot be read as an image ({e})") from None
  if image.ndim == 2:
    image = np.repeat(image[..., None], 3, axis=-1)
  return image[..., :3].astype(np.uint8)


def _weights(gen: Generation, mesh) -> dict:
  """The transformer weights: the root's (both experts for Wan 2.2 A14B) or a random init, with
  the LoRA files merged into the expert(s) the config names."""
  names = ("high_noise", "low_noise") if gen.family.experts else ("high_noise",)
  held = experts.held(gen.expert)
  return {name: experts.pretrained(
      gen.model, gen.weights, DTYPES[gen.options.weights_dtype], name,
      experts.init_key(gen.sampling.seed, gen.expert, name),
      experts.lora_loads(gen.lora_loads, gen.expert, name) if name in held else (), mesh)
      for name in names}


def build(gen: Generation, mesh) -> tuple[pipeline.Pipe, str]:
  """(the pipe, its weights' tag): the run's newest checkpoint replaces the expert it trained."""
  weights = _weights(gen, mesh)
  encoders = encode.parts(gen.encoding, "float32", gen.options.weights_dtype)
  pipe = pipeline.assemble(gen.family, gen.model, weights, gen.boundary, encoders, gen.options,
                           mesh)
  pipe, step = pipeline.with_checkpoint(pipe, gen.checkpoint_dir, gen.expert, gen.lora)
  return pipe, "base" if step is None else f"step_{step}"


def run(gen: Generation) -> list[str]:
  """Generates every prompt's video; returns the mp4 paths (process 0 writes them)."""
  mesh = sharding.make_mesh(gen.ici, gen.dcn)
  pipe, tag = build(gen, mesh)
  s = gen.sampling
  image = read_image(s.image) if s.image else None
  out_dir = fs.join(gen.samples_dir, tag)
  writing = jax.process_index() == 0
  if writing:
    fs.makedirs(out_dir)
    print(f"weights: {tag}; writing to {out_dir}", flush=True)
  paths = []
  for i, prompt in enumerate(s.prompts):
    video = pipeline.generate(
        pipe, prompt, negative_prompt=s.negative_prompt, height=s.height, width=s.width,
        num_frames=s.num_frames, num_inference_steps=s.num_inference_steps,
        guidance_scale=s.guidance_scale, guidance_scale_2=s.guidance_scale_2,
        flow_shift=s.flow_shift, sampler=s.sampler, seed=s.seed + i, image=image,
        max_sequence_length=s.max_sequence_length)[0]
    path = fs.join(out_dir, sample_name(i, prompt) + ".mp4")
    if writing:
      write_sample(out_dir, i, prompt, video, s.fps)
      print(f"  {path}", flush=True)
    paths.append(path)
  return paths
