"""Wan 2.2 TI2V 5B: one model for text-to-video and image-to-video (model_type T2V | I2V; in
I2V the clean first latent frame carries timestep 0 and is left out of the loss). 48-channel
latents from the Wan 2.2 VAE (16x spatial). Variants: 5b, tiny.

  python launch.py --config=configs/wan22_ti2v.py --config.ici_fsdp=8 --config.model_type=I2V
"""

from configs import base


def get_config(variant="5b"):
  return base.for_model(
      variant, {"5b": ("wan2.2-ti2v-5b", dict(height=704, width=1280, num_frames=121))},
      run_name="wan22_ti2v", model_name="wan2.2", model_type="T2V")  # 720p, 24 fps as released
