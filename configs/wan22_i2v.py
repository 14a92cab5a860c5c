"""Wan 2.2 image-to-video A14B: two experts, first-frame conditioning (no CLIP). Variants: a14b,
tiny.

  python launch.py --config=configs/wan22_i2v.py --config.ici_fsdp=8 --config.expert=high_noise
"""

from configs import base


def get_config(variant="a14b"):
  if variant not in ("a14b", "tiny"):
    raise ValueError(f"unknown variant {variant!r}; choose from ['a14b', 'tiny']")
  c = base.get_config()
  c.run_name = f"wan22_i2v_{variant}"
  c.model_name, c.model_type = "wan2.2", "I2V"
  c.model_preset = "wan2.2-i2v-a14b"
  return base.tiny(c) if variant == "tiny" else c
