"""Wan 2.2 image-to-video A14B: two experts, first-frame conditioning (no CLIP). Variants: a14b,
tiny.

  python launch.py --config=configs/wan22_i2v.py --config.ici_fsdp=8 --config.expert=high_noise
"""

from configs import base


def get_config(variant="a14b"):
  return base.for_model(variant, {"a14b": "wan2.2-i2v-a14b"}, run_name="wan22_i2v",
                        model_name="wan2.2", model_type="I2V")
