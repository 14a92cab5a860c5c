"""Wan 2.2 text-to-video A14B: two experts; a run trains the one named by `expert`, on its side
of the boundary (high_noise: sigma >= 0.875, low_noise: below). Variants: a14b, tiny.

  python launch.py --config=configs/wan22_t2v.py --config.ici_fsdp=8 --config.expert=low_noise
"""

from configs import base


def get_config(variant="a14b"):
  return base.for_model(variant, {"a14b": "wan2.2-t2v-a14b"}, run_name="wan22_t2v",
                        model_name="wan2.2", model_type="T2V",
                        flow_shift=12.0)  # Wan 2.2 A14B T2V's sampling shift
