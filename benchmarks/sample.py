"""Sampling benchmark for any config on whatever devices exist (CPU, GPU, TPU). Not a test.

  python benchmarks/sample.py --config=configs/wan21_t2v.py:1.3b --config.job=generate \
      --config.prompt="a cat" --config.height=480 --config.width=832 --config.num_frames=81 \
      --config.num_inference_steps=50 --config.hardware=gpu --config.attention=flash

The config's model samples one video of the config's size as job=generate does: its root, or
random weights for the tiny configs (with their built-in encoders). With --random_weights a
preset samples without a root: the transformer and the VAE of the released architectures with
random weights, from random caption states (no text encoder: its time is not measured). Prints
the time of the prompt encoding, the first step (compilation included), the mean of the others,
the VAE decode, the whole video, and the transformer TFLOP/s per device; the last line is JSON.
"""

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file[:variant], job=generate.")
_RANDOM = flags.DEFINE_bool("random_weights", False, "A preset without a root: random weights.")


def _random_generation(c):
  """The Generation of `c` with the tiny sibling's built-in encoders, then the real preset's
  transformer and the real latent space's VAE (random weights, no root)."""
  import dataclasses
  from wan import plan as plan_lib, transformer
  real = c.model_preset
  c.model_preset = "tiny-" + real.split("-", 1)[1].split("-")[0] + (
      "-a14b" if real.endswith("a14b") else "")
  gen = plan_lib.generation(c, plan_lib.Devices.of(__import__("jax").devices()))
  model = transformer.PRESETS[real]
  encoding = dataclasses.replace(gen.encoding, text_dim=model.text_dim, image_dim=model.image_dim)
  return dataclasses.replace(gen, model=model, encoding=encoding)


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  import jax
  import jax.numpy as jnp
  from wan import generate, pipeline, samplers, sharding, transformer
  from wan import plan as plan_lib

  c = _CONFIG.value
  preset = c.model_preset
  if _RANDOM.value:
    gen = _random_generation(c)
  else:
    gen = plan_lib.generation(c, plan_lib.Devices.of(jax.devices()))
  s = gen.sampling
  mesh = sharding.make_mesh(gen.ici, gen.dcn)
  pipe, tag = generate.build(gen, mesh)
  if _RANDOM.value:  # the released VAE architecture (random weights) in place of the tiny one
    import dataclasses
    from wan import vae
    vae_cfg = dataclasses.replace(vae.PRESETS[gen.family.vae], use_tiling=True)
    pipe = pipeline.place(dataclasses.replace(
        pipe, vae_cfg=vae_cfg, vae_params=vae.init(vae_cfg, jax.random.key(0))))
  v, t = pipe.vae_cfg.scale_factor_spatial, pipe.vae_cfg.scale_factor_temporal
  shape = (1, (s.num_frames - 1) // t + 1, s.height // v, s.width // v, pipe.vae_cfg.z_dim)
  guided = s.guidance_scale > 1

  t0 = time.perf_counter()
  if _RANDOM.value:
    text, negative = jax.random.normal(jax.random.key(1), (2, 1, s.max_sequence_length,
                                                           pipe.model.text_dim))
  else:
    text = pipeline.encode_prompts(pipe, list(s.prompts[:1]), s.max_sequence_length)
    negative = pipeline.encode_prompts(pipe, [s.negative_prompt], s.max_sequence_length)
  jax.block_until_ready((text, negative))
  encode_s = None if _RANDOM.value else time.perf_counter() - t0

  schedule = samplers.schedule(s.sampler, s.num_inference_steps, s.flow_shift)
  latents = jax.random.normal(jax.random.key(s.seed), shape, jnp.float32)
  times = []
  for n in (1, s.num_inference_steps):  # the first step alone: compilation
    sub = samplers.schedule(s.sampler, n, s.flow_shift) if n == 1 else schedule
    t0 = time.perf_counter()
    out = pipeline.denoise(pipe, latents, text, negative if guided else None, sub,
                           guidance_scale=s.guidance_scale, guidance_scale_2=s.guidance_scale_2,
                           progress=False)
    jax.block_until_ready(out)
    times.append(time.perf_counter() - t0)
  first_s, all_s = times
  step_s = all_s / s.num_inference_steps
  t0 = time.perf_counter()
  video = pipeline.decode(pipe, out)
  decode_s = time.perf_counter() - t0

  f, h, w = shape[1:4]
  pt, ph, pw = pipe.model.patch_size
  flops = transformer.flops(pipe.model, 2 if guided else 1, f, h, w, s.max_sequence_length,
                            pipe.family.image_tokens)
  devices = mesh.devices.size
  tflops = flops / step_s / devices / 1e12
  result = {
      "device": jax.devices()[0].device_kind, "devices": devices, "jax": jax.__version__,
      "model": gen.weights or preset, "weights": tag, "video": list(video.shape[1:4]),
      "tokens": (f // pt) * (h // ph) * (w // pw), "guided": guided,
      "sampler": s.sampler, "steps": s.num_inference_steps,
      "encode_s": encode_s and round(encode_s, 3), "first_step_s": round(first_s, 3),
      "step_s": round(step_s, 4), "decode_s": round(decode_s, 3),
      "video_s": round((encode_s or 0) + all_s + decode_s, 2),
      "tflops_per_device": round(tflops, 3)}
  print(f"devices      {devices} x {result['device']} (jax {jax.__version__}), mesh "
        f"{dict(mesh.shape)}")
  print(f"model        {result['model']} ({gen.family.name}), {result['tokens']} video tokens, "
        f"{'CFG (2 x batch)' if guided else 'no guidance'}")
  print(f"encode       {'not measured (random states)' if encode_s is None else f'{encode_s:.2f} s'}")
  print(f"first step   {first_s:.2f} s (compilation included)")
  print(f"step         {step_s:.3f} s ({tflops:.2f} TFLOP/s per device)")
  print(f"VAE decode   {decode_s:.2f} s ({s.num_frames} frames)")
  print(f"video        {result['video_s']:.1f} s for {s.num_inference_steps} steps")
  print(json.dumps(result))


if __name__ == "__main__":
  app.run(main)
