"""Wan 2.1 text-to-video. Variants: 1.3b, 14b (default), tiny (CPU, synthetic data).

  python launch.py --config=configs/wan21_t2v.py:1.3b --config.ici_fsdp=8
"""

from configs import base


def get_config(variant="14b"):
  c = base.get_config()
  c.run_name = f"wan21_t2v_{variant}"
  c.model_name, c.model_type = "wan2.1", "T2V"
  presets = {"1.3b": "wan2.1-t2v-1.3b", "14b": "wan2.1-t2v-14b", "tiny": "wan2.1-t2v-1.3b"}
  if variant not in presets:
    raise ValueError(f"unknown variant {variant!r}; choose from {sorted(presets)}")
  c.model_preset = presets[variant]
  if variant == "1.3b":
    c.height, c.width = 480, 832  # the 1.3B model's native resolution
  return base.tiny(c) if variant == "tiny" else c
