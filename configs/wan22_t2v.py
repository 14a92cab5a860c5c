"""Wan 2.2 text-to-video A14B: two experts; a run trains the one named by `expert`, on its side
of the boundary (high_noise: sigma >= 0.875, low_noise: below). Variants: a14b, tiny.

  python launch.py --config=configs/wan22_t2v.py --config.ici_fsdp=8 --config.expert=low_noise
"""

from configs import base


def get_config(variant="a14b"):
  if variant not in ("a14b", "tiny"):
    raise ValueError(f"unknown variant {variant!r}; choose from ['a14b', 'tiny']")
  c = base.get_config()
  c.run_name = f"wan22_t2v_{variant}"
  c.model_name, c.model_type = "wan2.2", "T2V"
  c.model_preset = "wan2.2-t2v-a14b"
  c.flow_shift = 12.0  # Wan 2.2 A14B T2V's sampling shift
  return base.tiny(c) if variant == "tiny" else c
