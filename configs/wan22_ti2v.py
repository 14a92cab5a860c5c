"""Wan 2.2 TI2V 5B: one model for text-to-video and image-to-video (model_type T2V | I2V; in
I2V the clean first latent frame carries timestep 0 and is left out of the loss). 48-channel
latents from the Wan 2.2 VAE (16x spatial). Variants: 5b, tiny.

  python launch.py --config=configs/wan22_ti2v.py --config.ici_fsdp=8 --config.model_type=I2V
"""

from configs import base


def get_config(variant="5b"):
  if variant not in ("5b", "tiny"):
    raise ValueError(f"unknown variant {variant!r}; choose from ['5b', 'tiny']")
  c = base.get_config()
  c.run_name = f"wan22_ti2v_{variant}"
  c.model_name, c.model_type = "wan2.2", "T2V"
  c.model_preset = "wan2.2-ti2v-5b"
  c.height, c.width, c.num_frames = 704, 1280, 121  # 720p at 24 fps, as released
  return base.tiny(c) if variant == "tiny" else c
