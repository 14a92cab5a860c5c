"""Wan 2.1 image-to-video 14B (CLIP image tokens + first-frame conditioning). Variants: 14b, tiny.

  python launch.py --config=configs/wan21_i2v.py --config.ici_fsdp=8
"""

from configs import base


def get_config(variant="14b"):
  return base.for_model(variant, {"14b": "wan2.1-i2v-14b"}, run_name="wan21_i2v",
                        model_name="wan2.1", model_type="I2V")
