"""Wan 2.1 image-to-video 14B (CLIP image tokens + first-frame conditioning). Variants: 14b, tiny.

  python launch.py --config=configs/wan21_i2v.py --config.ici_fsdp=8
"""

from configs import base


def get_config(variant="14b"):
  if variant not in ("14b", "tiny"):
    raise ValueError(f"unknown variant {variant!r}; choose from ['14b', 'tiny']")
  c = base.get_config()
  c.run_name = f"wan21_i2v_{variant}"
  c.model_name, c.model_type = "wan2.1", "I2V"
  c.model_preset = "wan2.1-i2v-14b"
  return base.tiny(c) if variant == "tiny" else c
